"""The real kopf loop of tusk.operator.handlers against the emulated API server."""

from __future__ import annotations

from operator_harness import Cluster, eventually

SPEC = {"model": {"source": "hf://org/model"}, "prefill": {"replicas": 1}, "decode": {"replicas": 2}}
CHILDREN = [
    ("v1/configmaps", "m1-config"),
    ("apps/v1/deployments", "m1-kv"),
    ("v1/services", "m1-kv"),
    ("v1/services", "m1-prefill"),
    ("apps/v1/deployments", "m1-prefill"),
    ("policy/v1/poddisruptionbudgets", "m1-prefill"),
    ("v1/services", "m1-decode"),
    ("apps/v1/deployments", "m1-decode"),
    ("policy/v1/poddisruptionbudgets", "m1-decode"),
]


async def test_create_makes_every_child_with_owner_and_status(cluster: Cluster, operator) -> None:
    md = await cluster.create_md("m1", SPEC)
    uid = md["metadata"]["uid"]
    for resource, name in CHILDREN:
        child = await eventually(
            lambda r=resource, n=name: cluster.get(r, "default", n), what=f"{resource} {name}"
        )
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert child["metadata"]["labels"]["tusk.dev/model"] == "m1"
    status = await eventually(
        lambda: (cluster.md("m1") or {}).get("status", {}).get("conditions") and cluster.md("m1")["status"]
    )
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://router.test/v1"
    assert status["decode"]["ready"] == "0/2"
    assert cluster.condition("m1", "Ready")["reason"] == "NoDecodeWorkerReady"
