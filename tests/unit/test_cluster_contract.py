"""The operator writes a ModelDeployment's worker Deployments; the router's discovery reads the
ModelDeployment and the pods those Deployments make. This checks the two halves of that contract
against each other: owner chain, roles, ports, served names, block size and routing."""

from __future__ import annotations

import copy

from tusk.operator import schema
from tusk.operator.desired import Owner, desired_children
from tusk.operator.spec import parse_spec
from tusk.router.discovery import ModelDeploymentView, OwnerChain, pod_endpoint

from tusk.config import Role

UID = "uid-md-1"


def _model_deployment(spec: dict) -> dict:
    return {
        "apiVersion": f"{schema.GROUP}/{schema.VERSION}",
        "kind": schema.KIND,
        "metadata": {"name": "llama", "namespace": "ml", "uid": UID},
        "spec": spec,
    }


def _cluster(spec: dict) -> tuple[dict[tuple[str, str], dict], dict[str, dict]]:
    """The worker Deployments as the operator builds them, each with a ReplicaSet and a running,
    Ready pod made from its template, owned the way the Deployment controller owns them."""
    children = desired_children(Owner("llama", "ml", UID), parse_spec(spec))
    objects: dict[tuple[str, str], dict] = {}
    pods: dict[str, dict] = {}
    for i, dep in enumerate(c for c in children if c["kind"] == "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/name") != "tusk-worker" or not dep["spec"].get("replicas"):
            continue
        dep = copy.deepcopy(dep)
        dep["metadata"]["uid"] = f"uid-dep-{i}"
        rs_name = f"{dep['metadata']['name']}-5d8f"
        objects[("Deployment", dep["metadata"]["name"])] = dep
        controller = {"apiVersion": "apps/v1", "controller": True}
        objects[("ReplicaSet", rs_name)] = {
            "metadata": {
                "name": rs_name,
                "namespace": "ml",
                "uid": f"uid-rs-{i}",
                "ownerReferences": [
                    {
                        **controller,
                        "kind": "Deployment",
                        "name": dep["metadata"]["name"],
                        "uid": f"uid-dep-{i}",
                    }
                ],
            }
        }
        template = copy.deepcopy(dep["spec"]["template"])
        template["metadata"] |= {
            "name": f"{rs_name}-x",
            "namespace": "ml",
            "ownerReferences": [{**controller, "kind": "ReplicaSet", "name": rs_name, "uid": f"uid-rs-{i}"}],
        }
        role = template["metadata"]["labels"]["tusk.dev/role"]
        pods[role] = {
            "metadata": template["metadata"],
            "spec": template["spec"],
            "status": {
                "phase": "Running",
                "podIP": f"10.0.0.{i}",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    return objects, pods


def test_the_operators_pods_are_trusted_with_their_roles_and_ports():
    spec = {
        "model": {"source": "tiny"},
        "servedModelNames": ["llama-chat"],
        "blockSize": 32,
        "prefill": {"replicas": 1},
        "decode": {"replicas": 2},
        "routing": {"policy": "cache_aware", "disaggregationThreshold": 256},
    }
    objects, pods = _cluster(spec)
    chain = OwnerChain(lambda kind, ns, name: objects.get((kind, name)) if ns == "ml" else None)
    assert set(pods) == {"prefill", "decode"}
    for role, pod in pods.items():
        assert chain.model_deployment(pod) == ("llama", UID)
        address, found_role = pod_endpoint(pod)
        assert found_role == Role(role) and address.endswith(":50051")
    view = ModelDeploymentView.parse(_model_deployment(spec))
    assert (view.key, view.served_names, view.block_size) == ("ml/llama", ("llama-chat",), 32)
    assert view.routing is not None and view.routing_error is None
    assert (view.routing.policy, view.routing.disaggregation_threshold_tokens) == ("cache_aware", 256)


def test_a_decode_only_model_serves_by_its_own_name_with_default_routing():
    spec = {"model": {"source": "tiny"}, "prefill": {"replicas": 0}}
    _, pods = _cluster(spec)
    assert [pod_endpoint(p)[1] for p in pods.values()] == [Role.BOTH]
    view = ModelDeploymentView.parse(_model_deployment(spec))
    assert view.served_names == ("llama",) and view.block_size == 16
    assert view.routing is not None and view.routing.policy == "cost"


def test_a_bad_routing_setting_names_its_field():
    view = ModelDeploymentView.parse(
        _model_deployment({"model": {"source": "tiny"}, "routing": {"disaggregationThreshold": -5}})
    )
    assert view.routing is None
    assert view.routing_error is not None and view.routing_error.startswith(
        "spec.routing.disaggregationThreshold"
    )
