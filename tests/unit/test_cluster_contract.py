"""The operator writes worker pods; the router's discovery reads them. This checks the two halves
of that contract against each other: labels, roles, ports, served names and per-model routing."""

from __future__ import annotations

import copy

from tusk.operator.desired import Owner, desired_children
from tusk.operator.spec import parse_spec
from tusk.router.discovery import model_routing, pod_endpoints

from tusk.config import Role, RoutingConfig


def _running_pod(deployment: dict, ip: str) -> dict:
    """What the Deployment's pod template becomes once scheduled and Ready."""
    template = copy.deepcopy(deployment["spec"]["template"])
    template["metadata"] |= {"name": f"{deployment['metadata']['name']}-x", "namespace": "ml"}
    return {
        "metadata": template["metadata"],
        "spec": template["spec"],
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _worker_deployments(spec: dict) -> dict[str, dict]:
    children = desired_children(Owner("llama", "ml", "uid-1"), parse_spec(spec))
    return {
        c["metadata"]["labels"]["tusk.dev/role"]: c
        for c in children
        if c["kind"] == "Deployment"
        and c["metadata"]["labels"].get("app.kubernetes.io/name") == "tusk-worker"
    }


def test_disaggregated_pods_are_discovered_with_roles_names_and_routing():
    spec = {
        "model": {"source": "tiny"},
        "servedModelNames": ["llama-chat"],
        "prefill": {"replicas": 1},
        "decode": {"replicas": 2},
        "routing": {"policy": "cache_aware", "disaggregationThreshold": 256},
    }
    deployments = _worker_deployments(spec)
    assert set(deployments) == {"prefill", "decode"}
    found = {
        role: pod_endpoints(_running_pod(d, f"10.0.0.{i}"))
        for i, (role, d) in enumerate(sorted(deployments.items()))
    }
    (decode,) = found["decode"]
    (prefill,) = found["prefill"]
    assert (decode.model, decode.role, decode.address) == ("llama-chat", Role.DECODE, "10.0.0.0:50051")
    assert (prefill.model, prefill.role) == ("llama-chat", Role.PREFILL)
    routing = model_routing(decode, RoutingConfig(policy="round_robin"))
    assert (routing.policy, routing.disaggregation_threshold_tokens) == ("cache_aware", 256)


def test_routing_defaults_to_the_routers_when_pods_carry_none():
    deployments = _worker_deployments({"model": {"source": "tiny"}, "prefill": {"replicas": 0}})
    pod = _running_pod(
        deployments["both"] if "both" in deployments else next(iter(deployments.values())), "10.1.0.1"
    )
    del pod["metadata"]["annotations"]["tusk.dev/routing"]
    (worker,) = pod_endpoints(pod)
    assert worker.role in (Role.BOTH, Role.DECODE)
    assert model_routing(worker, RoutingConfig(policy="session")).policy == "session"


def test_a_bad_routing_annotation_is_ignored():
    deployments = _worker_deployments({"model": {"source": "tiny"}})
    pod = _running_pod(next(iter(deployments.values())), "10.2.0.1")
    pod["metadata"]["annotations"]["tusk.dev/routing"] = "{not json"
    worker = pod_endpoints(pod)[0]
    assert model_routing(worker, RoutingConfig(policy="random")).policy == "random"
