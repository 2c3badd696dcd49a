"""The real kopf loop of tusk.operator.handlers against the emulated API server."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from operator_harness import Cluster, OperatorThread, eventually

SPEC = {"model": {"source": "hf://org/model"}, "prefill": {"replicas": 1}, "decode": {"replicas": 2}}
CHILDREN = [
    ("v1/secrets", "m1-kv-auth"),
    ("apps/v1/deployments", "m1-kv"),
    ("v1/services", "m1-kv"),
    ("networking.k8s.io/v1/networkpolicies", "m1-kv"),
    ("v1/services", "m1-prefill"),
    ("apps/v1/deployments", "m1-prefill"),
    ("policy/v1/poddisruptionbudgets", "m1-prefill"),
    ("v1/services", "m1-decode"),
    ("apps/v1/deployments", "m1-decode"),
    ("policy/v1/poddisruptionbudgets", "m1-decode"),
]


def config_of(cluster: Cluster, deployment_name: str, namespace: str = "default") -> dict | None:
    """The ConfigMap a worker Deployment mounts (it is named by its content)."""
    deployment = cluster.deployment(deployment_name, namespace)
    if deployment is None:
        return None
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    name = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
    return cluster.get("v1/configmaps", namespace, name)


async def test_create_makes_every_child_with_owner_and_status(cluster: Cluster, operator) -> None:
    md = await cluster.create_md("m1", SPEC)
    uid = md["metadata"]["uid"]
    for resource, name in CHILDREN:
        child = await eventually(
            lambda r=resource, n=name: cluster.get(r, "default", n), what=f"{resource} {name}"
        )
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert child["metadata"]["labels"]["tusk.dev/model"] == "m1"
    for role in ("prefill", "decode"):
        config = await eventually(lambda r=role: config_of(cluster, f"m1-{r}"), what=f"{role} config")
        assert config["metadata"]["ownerReferences"][0]["uid"] == uid
    # The generated tier password is created once and never read back.
    secret = cluster.get("v1/secrets", "default", "m1-kv-auth")
    assert len(secret["stringData"]["password"]) >= 32
    status = await eventually(
        lambda: (cluster.md("m1") or {}).get("status", {}).get("conditions") and cluster.md("m1")["status"]
    )
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://router.test/v1"
    assert status["decode"]["ready"] == "0/2"
    assert cluster.condition("m1", "Ready")["reason"] == "NoDecodeWorkerReady"


def _ready_status(cluster: Cluster, name: str) -> bool:
    cond = cluster.condition(name, "Ready")
    return bool(cond and cond["status"] == "True")


async def test_ready_when_workers_report_ready(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", SPEC)
    await eventually(lambda: cluster.deployment("m1-decode") and cluster.deployment("m1-prefill"))
    cluster.set_ready("m1-decode")
    cluster.set_ready("m1-prefill")
    await eventually(lambda: _ready_status(cluster, "m1"), what="Ready=True")
    await eventually(lambda: cluster.md("m1")["status"]["phase"] == "Ready", what="phase Ready")
    status = cluster.md("m1")["status"]
    assert status["decode"]["ready"] == "2/2"
    assert status["decode"]["readyReplicas"] == 2
    assert cluster.condition("m1", "Progressing")["status"] == "False"
    assert cluster.condition("m1", "Degraded")["reason"] == "AsExpected"
    await eventually(lambda: any(e["reason"] == "Ready" for e in cluster.events("m1")), what="event")


async def test_update_rolls_workers_and_scale_changes_replicas(cluster: Cluster, operator) -> None:
    md = await cluster.create_md("m1", SPEC)
    old = await eventually(lambda: config_of(cluster, "m1-decode"))
    # The single ConfigMap an earlier operator version made: it goes after the first full rollout.
    legacy = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "m1-config",
            "labels": {
                "tusk.dev/model": "m1",
                "app.kubernetes.io/component": "config",
                "tusk.dev/role": "config",
            },
            "ownerReferences": [{**old["metadata"]["ownerReferences"][0], "uid": md["metadata"]["uid"]}],
        },
        "data": {"decode.json": "{}"},
    }
    await cluster.create("/api/v1/namespaces/default/configmaps", legacy)

    # A new model version: a new ConfigMap, so the pod template changes (a rolling update).
    await cluster.patch_md("m1", {"spec": {"model": {"source": "hf://org/model@v2"}}})
    await eventually(
        lambda: config_of(cluster, "m1-decode")["metadata"]["name"] != old["metadata"]["name"],
        what="new config",
    )
    decode = cluster.deployment("m1-decode")
    assert decode["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert "hf://org/model@v2" in config_of(cluster, "m1-decode")["data"]["worker.json"]
    # The old config stays while old pods may still restart, and goes once the rollout is over.
    assert cluster.get("v1/configmaps", "default", old["metadata"]["name"]) is not None
    cluster.set_ready("m1-decode")
    cluster.set_ready("m1-prefill")
    await eventually(
        lambda: cluster.get("v1/configmaps", "default", old["metadata"]["name"]) is None,
        what="old config pruned",
    )
    await eventually(
        lambda: cluster.get("v1/configmaps", "default", "m1-config") is None, what="legacy pruned"
    )

    # kubectl scale md/m1 --replicas=4 writes spec.decode.replicas through the scale subresource.
    await cluster.patch_md("m1", {"spec": {"decode": {"replicas": 4}}})
    await eventually(lambda: cluster.deployment("m1-decode")["spec"]["replicas"] == 4, what="scaled to 4")
    await eventually(
        lambda: cluster.md("m1")["status"]["observedGeneration"] == 3, what="observedGeneration 3"
    )
    assert cluster.md("m1")["status"]["decode"]["ready"] == "2/4"  # two were set ready above


async def test_drift_is_repaired(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", SPEC)
    config = await eventually(lambda: config_of(cluster, "m1-decode"))
    # Someone edits children by hand: replicas, the worker image, and a config value.
    await cluster.request(
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/m1-decode",
        {
            "spec": {
                "replicas": 7,
                "template": {"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}},
            }
        },
        "application/merge-patch+json",
    )
    await cluster.request("DELETE", f"/api/v1/namespaces/default/configmaps/{config['metadata']['name']}")

    def repaired() -> bool:
        decode = cluster.deployment("m1-decode")
        return (
            decode["spec"]["replicas"] == 2
            and decode["spec"]["template"]["spec"]["containers"][0]["image"] == "tusk-test:1"
            and config_of(cluster, "m1-decode") is not None
        )

    await eventually(repaired, what="drift repaired")
    await eventually(lambda: any(e["reason"] == "DriftRepaired" for e in cluster.events("m1")), what="event")


async def test_deleted_child_is_recreated(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", SPEC)
    await eventually(lambda: cluster.get("v1/services", "default", "m1-decode"))
    await cluster.request("DELETE", "/api/v1/namespaces/default/services/m1-decode")
    await eventually(lambda: cluster.get("v1/services", "default", "m1-decode"), what="service recreated")


async def test_delete_removes_children(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", SPEC)
    for resource, name in CHILDREN:
        await eventually(lambda r=resource, n=name: cluster.get(r, "default", n))
    await cluster.delete_md("m1")
    await eventually(lambda: cluster.md("m1") is None, what="ModelDeployment gone (finalizer released)")
    for resource, name in CHILDREN:
        if resource != "v1/secrets":  # the generated Secret goes with the garbage collector
            assert cluster.get(resource, "default", name) is None, (resource, name)
    assert not [c for c in cluster.live_objects("v1/configmaps") if c["metadata"]["name"].startswith("m1-")]
    await eventually(lambda: any(e["reason"] == "Deleted" for e in cluster.events("m1")), what="event")


async def test_switching_to_external_tier_prunes_managed_tier(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", SPEC)
    await eventually(lambda: cluster.deployment("m1-kv"))
    await cluster.patch_md(
        "m1", {"spec": {"kvTier": {"managed": None, "external": {"url": "redis://shared:6379/0"}}}}
    )
    await eventually(lambda: cluster.deployment("m1-kv") is None, what="managed tier pruned")
    assert cluster.get("v1/services", "default", "m1-kv") is None
    assert cluster.get("networking.k8s.io/v1/networkpolicies", "default", "m1-kv") is None
    await eventually(
        lambda: "redis://shared:6379/0" in config_of(cluster, "m1-decode")["data"]["worker.json"]
    )


async def test_restart_does_not_duplicate_children(cluster: Cluster, options) -> None:
    first = OperatorThread(options)
    await first.start()
    await cluster.create_md("m1", SPEC)
    for resource, name in CHILDREN:
        await eventually(lambda r=resource, n=name: cluster.get(r, "default", n))
    await first.stop()

    second = OperatorThread(options)
    await second.start()
    try:
        # The resumed operator runs its resume handler and resyncs at least twice.
        await asyncio.sleep(options.resync_seconds * 3)
        await eventually(lambda: cluster.md("m1")["status"].get("conditions"))
    finally:
        await second.stop()
    for resource in ("apps/v1/deployments", "v1/services", "v1/configmaps", "policy/v1/poddisruptionbudgets"):
        names = cluster.creations(resource)
        assert len(names) == len(set(names)), f"{resource} created twice: {names}"
    assert len(cluster.live_objects("apps/v1/deployments")) == 3


async def test_bad_objects_degrade_alone(cluster: Cluster, operator) -> None:
    await cluster.create_md("good", SPEC)
    await cluster.create_md(
        "nosecret", {**SPEC, "model": {"source": "hf://org/m", "tokenSecretRef": {"name": "hf"}}}
    )
    await cluster.create_md("nogpu", {**SPEC, "decode": {"replicas": 1, "accelerator": "amd"}})
    await cluster.create_md(
        "badmount", {**SPEC, "decode": {"replicas": 1, "volumeMounts": [{"name": "x", "mountPath": "/x"}]}}
    )
    await cluster.create_md("invalid", {"model": {"source": "ftp://nope"}, "decode": {"replicas": 0}})
    await cluster.create_md("after", SPEC)

    # No node offers the GPU yet: a warning, and the workers are still created (a node autoscaler
    # adds GPU nodes only for Pending pods).
    for name in ("good", "after", "nogpu"):
        await eventually(lambda n=name: cluster.deployment(f"{n}-decode"), what=f"{name} reconciled")

    def degraded(name: str, reason: str) -> bool:
        cond = cluster.condition(name, "Degraded")
        return bool(cond and cond["status"] == "True" and cond["reason"] == reason)

    await eventually(lambda: degraded("nosecret", "SecretNotFound"), what="nosecret degraded")
    await eventually(lambda: degraded("invalid", "InvalidSpec"), what="invalid degraded")
    await eventually(lambda: degraded("badmount", "InvalidVolumes"), what="badmount degraded")
    await eventually(
        lambda: (cluster.condition("nogpu", "Schedulable") or {}).get("reason") == "AcceleratorUnavailable",
        what="nogpu warned",
    )
    assert cluster.condition("nogpu", "Schedulable")["status"] == "False"
    assert "amd.com/gpu" in cluster.condition("nogpu", "Schedulable")["message"]
    assert cluster.condition("nogpu", "Degraded")["status"] == "False"
    assert "Secret 'hf' not found" in cluster.condition("nosecret", "Degraded")["message"]
    assert "spec.decode.volumeMounts" in cluster.condition("badmount", "Degraded")["message"]
    invalid_message = cluster.condition("invalid", "Degraded")["message"]
    assert "spec.model.source: 'ftp://nope' is not valid" in invalid_message and "hf://" in invalid_message
    # Broken objects get no workers; every problem gets a warning Event.
    for name in ("nosecret", "invalid", "badmount"):
        assert cluster.deployment(f"{name}-decode") is None
    for name in ("nosecret", "nogpu", "invalid", "badmount"):
        await eventually(
            lambda n=name: any(e["type"] == "Warning" for e in cluster.events(n)), what=f"{name} event"
        )
    await eventually(lambda: (cluster.condition("good", "Degraded") or {}).get("status") == "False")

    # Fixing the cause recovers without touching the ModelDeployment.
    await cluster.create(
        "/api/v1/namespaces/default/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"}, "data": {"token": "aGZfdG9rZW4="}},
    )
    await eventually(lambda: cluster.deployment("nosecret-decode"), what="recovered after Secret appeared")
    await eventually(lambda: cluster.condition("nosecret", "Degraded")["status"] == "False")
    env = cluster.deployment("nosecret-decode")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env


async def test_accelerator_present_on_a_node_is_accepted(cluster: Cluster, operator) -> None:
    await cluster.create(
        "/api/v1/nodes",
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "gpu-1"},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}},
        },
    )
    await cluster.create_md("gpu", {**SPEC, "decode": {"replicas": 1, "accelerator": "nvidia"}})
    decode = await eventually(lambda: cluster.deployment("gpu-decode"))
    container = decode["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # stored canonical
    assert "nodeSelector" not in decode["spec"]["template"]["spec"]
    await eventually(lambda: (cluster.condition("gpu", "Schedulable") or {}).get("status") == "True")


async def test_paused_stops_changes(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", {**SPEC, "paused": True})
    await eventually(lambda: cluster.md("m1").get("status", {}).get("phase") == "Paused", what="phase Paused")
    assert cluster.deployment("m1-decode") is None
    await cluster.patch_md("m1", {"spec": {"paused": False}})
    await eventually(lambda: cluster.deployment("m1-decode"), what="unpaused")


N = 100


async def test_hundred_model_deployments(cluster: Cluster, options) -> None:
    runner = OperatorThread(replace(options, resync_seconds=60))
    await runner.start()
    try:
        for i in range(N):
            await cluster.create_md(f"md{i:03d}", {"model": {"source": "tiny"}, "kvTier": {}})

        def reconciled() -> int:
            return sum(
                1
                for i in range(N)
                if (cluster.md(f"md{i:03d}") or {}).get("status", {}).get("observedGeneration") == 1
            )

        await eventually(lambda: reconciled() == N, timeout=120, interval=0.2, what=f"{N} statuses")
    finally:
        await runner.stop()
    assert len(cluster.live_objects("apps/v1/deployments")) == 2 * N
    names = cluster.creations("apps/v1/deployments")
    assert len(names) == len(set(names)) == 2 * N
    assert all(cluster.condition(f"md{i:03d}", "Degraded")["status"] == "False" for i in range(N))
