"""The operator's InferencePool (inference.networking.k8s.io/v1): one per ModelDeployment where the
CRD is served, none where it is not; it selects the decode workers' pods, targets their HTTP port,
names the picker Service, follows the ModelDeployment and goes with it."""

from __future__ import annotations

import kmock
import pytest
from operator_harness import Cluster, eventually
from tusk.operator import desired, inference_pool, manifests
from tusk.operator.desired import Owner
from tusk.operator.spec import parse_spec

POOLS = "inference.networking.k8s.io/v1/inferencepools"
GROUP = "inference.networking.k8s.io"


def declare_pool_crd(cluster: Cluster) -> None:
    cluster.emulator.resources[POOLS] = kmock.ResourceInfo(
        kind="InferencePool",
        singular="inferencepool",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
    )


def test_builder_selects_the_decode_workers_and_names_the_picker() -> None:
    owner = Owner("chat", "prod", "uid-1")
    pool = inference_pool.inference_pool(owner, "chat-epp", worker_http_port=8080)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["kind"] == "InferencePool"
    assert pool["metadata"]["ownerReferences"] == [owner.reference()]
    spec = pool["spec"]
    assert spec["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "tusk-worker",
        "app.kubernetes.io/component": "decode",
        "tusk.dev/model": "chat",
    }
    assert spec["targetPorts"] == [{"number": 8080}]
    assert spec["endpointPickerRef"] == {
        "kind": "Service",
        "name": "chat-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    fail_open = inference_pool.inference_pool(owner, "e", fail_open=True)
    assert fail_open["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    with pytest.raises(ValueError):
        inference_pool.inference_pool(owner, "e", picker_port=0)


@pytest.mark.parametrize("prefill", [0, 1])
def test_selector_matches_decode_pods_only_and_they_serve_http(prefill: int) -> None:
    owner = Owner("chat", "prod", "uid-1")
    spec = parse_spec({"model": {"source": "tiny"}, "prefill": {"replicas": prefill}})
    children = {(c["kind"], c["metadata"]["name"]): c for c in desired.desired_children(owner, spec)}
    selector = inference_pool.inference_pool(owner)["spec"]["selector"]["matchLabels"]
    for role in ("decode", "prefill"):
        template = children[("Deployment", f"chat-{role}")]["spec"]["template"]
        matches = selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        config = next(
            c
            for (kind, name), c in children.items()
            if kind == "ConfigMap" and name.startswith(f"chat-{role}-")
        )
        http_port = desired.WorkerConfig.model_validate_json(config["data"]["worker.json"]).http_port
        if role == "decode":
            assert matches and ports["http"] == desired.HTTP_PORT == http_port
        else:
            assert not matches and "http" not in ports and http_port is None


async def test_no_pool_where_the_crd_is_not_served(cluster: Cluster, operator) -> None:
    await cluster.create_md("plain", {"model": {"source": "tiny"}})
    await eventually(lambda: cluster.deployment("plain-decode"), what="children")
    await eventually(lambda: cluster.condition("plain", "Ready"), what="status written")
    assert cluster.live_objects(POOLS) == []
    assert not [c for c in cluster.emulator.calls if c[1] == GROUP]


async def test_pool_follows_the_model_deployment(
    cluster: Cluster, operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference_pool, "REFRESH_S", 0.2)
    monkeypatch.setenv(inference_pool.PICKER_SERVICE_ENV, "gw-epp")
    await cluster.create_md("chat", {"model": {"source": "tiny"}, "decode": {"replicas": 2}})
    await eventually(lambda: cluster.deployment("chat-decode"), what="children")
    # The CRD is installed while the operator runs: the next pass creates the pool.
    declare_pool_crd(cluster)
    pool = await eventually(lambda: cluster.get(POOLS, "default", "chat"), what="pool created")
    md = cluster.md("chat")
    assert pool["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]
    assert pool["spec"]["targetPorts"] == [{"number": desired.HTTP_PORT}]
    assert pool["spec"]["endpointPickerRef"]["name"] == "gw-epp"
    template = cluster.deployment("chat-decode")["spec"]["template"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert ports["http"] == desired.HTTP_PORT

    # Someone edits the pool: the operator puts it back.
    path = "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools/chat"
    await cluster.request(
        "PATCH", path, {"spec": {"targetPorts": [{"number": 1234}]}}, "application/merge-patch+json"
    )
    await eventually(
        lambda: (
            cluster.get(POOLS, "default", "chat")["spec"]["targetPorts"] == [{"number": desired.HTTP_PORT}]
        ),
        what="drift repaired",
    )
    # A pool of someone else with a model's name is never taken over.
    foreign = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "other"},
        "spec": {"targetPorts": [{"number": 1}]},
    }
    await cluster.create("/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools", foreign)
    await cluster.create_md("other", {"model": {"source": "tiny"}})
    await eventually(
        lambda: (cluster.condition("other", "Degraded") or {}).get("reason") == "ChildConflict",
        what="conflict reported",
    )
    assert cluster.get(POOLS, "default", "other")["spec"]["targetPorts"] == [{"number": 1}]

    await cluster.delete_md("chat")
    await eventually(lambda: cluster.md("chat") is None, what="deleted")
    assert cluster.get(POOLS, "default", "chat") is None

    # Every call the operator made on pools is granted, and every granted verb was used.
    operator_calls = {
        (verb, resource)
        for verb, group, resource, token in cluster.emulator.calls
        if group == GROUP and token == "test"
    }
    granted = {
        (verb, resource)
        for rule in manifests.rbac_rules()
        if GROUP in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert operator_calls == granted
