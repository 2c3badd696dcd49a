"""The real kopf loop of tusk.operator.handlers against the emulated API server."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from operator_harness import Cluster, OperatorThread, eventually

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
    await cluster.create_md("m1", SPEC)
    first = await eventually(lambda: cluster.deployment("m1-decode"))
    old_hash = first["spec"]["template"]["metadata"]["annotations"]["tusk.dev/config-hash"]

    # A new model version: the config changes, so the pod template hash changes (a rolling update).
    await cluster.patch_md("m1", {"spec": {"model": {"source": "hf://org/model@v2"}}})

    def rolled() -> bool:
        annotations = cluster.deployment("m1-decode")["spec"]["template"]["metadata"]["annotations"]
        return annotations["tusk.dev/config-hash"] != old_hash

    await eventually(rolled, what="new config hash")
    decode = cluster.deployment("m1-decode")
    assert decode["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    config = cluster.get("v1/configmaps", "default", "m1-config")
    assert "hf://org/model@v2" in config["data"]["decode.json"]

    # kubectl scale md/m1 --replicas=4 writes spec.decode.replicas through the scale subresource.
    await cluster.patch_md("m1", {"spec": {"decode": {"replicas": 4}}})
    await eventually(lambda: cluster.deployment("m1-decode")["spec"]["replicas"] == 4, what="scaled to 4")
    await eventually(
        lambda: cluster.md("m1")["status"]["observedGeneration"] == 3, what="observedGeneration 3"
    )
    assert cluster.md("m1")["status"]["decode"]["ready"] == "0/4"


async def test_drift_is_repaired(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", SPEC)
    await eventually(lambda: cluster.get("v1/configmaps", "default", "m1-config"))
    await eventually(lambda: cluster.deployment("m1-decode"))
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
    await cluster.request(
        "PATCH",
        "/api/v1/namespaces/default/configmaps/m1-config",
        {"data": {"decode.json": "{}", "extra.json": "{}"}},
        "application/merge-patch+json",
    )

    def repaired() -> bool:
        decode = cluster.deployment("m1-decode")
        config = cluster.get("v1/configmaps", "default", "m1-config")
        return (
            decode["spec"]["replicas"] == 2
            and decode["spec"]["template"]["spec"]["containers"][0]["image"] == "tusk-test:1"
            and config["data"]["decode.json"] != "{}"
            and "extra.json" not in config["data"]
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
        assert cluster.get(resource, "default", name) is None, (resource, name)
    await eventually(lambda: any(e["reason"] == "Deleted" for e in cluster.events("m1")), what="event")


async def test_switching_to_external_tier_prunes_managed_tier(cluster: Cluster, operator) -> None:
    await cluster.create_md("m1", SPEC)
    await eventually(lambda: cluster.deployment("m1-kv"))
    await cluster.patch_md(
        "m1", {"spec": {"kvTier": {"managed": None, "external": {"url": "redis://shared:6379/0"}}}}
    )
    await eventually(lambda: cluster.deployment("m1-kv") is None, what="managed tier pruned")
    assert cluster.get("v1/services", "default", "m1-kv") is None
    assert (
        "redis://shared:6379/0" in cluster.get("v1/configmaps", "default", "m1-config")["data"]["decode.json"]
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
    await cluster.create_md("invalid", {"model": {"source": "ftp://nope"}, "decode": {"replicas": 0}})
    await cluster.create_md("after", SPEC)

    for name in ("good", "after"):
        await eventually(lambda n=name: cluster.deployment(f"{n}-decode"), what=f"{name} reconciled")

    def degraded(name: str, reason: str) -> bool:
        cond = cluster.condition(name, "Degraded")
        return bool(cond and cond["status"] == "True" and cond["reason"] == reason)

    await eventually(lambda: degraded("nosecret", "SecretNotFound"), what="nosecret degraded")
    await eventually(lambda: degraded("nogpu", "AcceleratorUnavailable"), what="nogpu degraded")
    await eventually(lambda: degraded("invalid", "InvalidSpec"), what="invalid degraded")
    assert "Secret 'hf' not found" in cluster.condition("nosecret", "Degraded")["message"]
    assert "amd.com/gpu" in cluster.condition("nogpu", "Degraded")["message"]
    invalid_message = cluster.condition("invalid", "Degraded")["message"]
    assert "spec.model.source: 'ftp://nope' is not valid: use tiny, hf://" in invalid_message
    # Broken objects get no workers, and a warning Event each.
    for name in ("nosecret", "nogpu", "invalid"):
        assert cluster.deployment(f"{name}-decode") is None
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
    await cluster.create_md(
        "gpu", {**SPEC, "decode": {"replicas": 1, "accelerator": "nvidia", "acceleratorsPerReplica": 2}}
    )
    decode = await eventually(lambda: cluster.deployment("gpu-decode"))
    container = decode["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert decode["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.present"] == "true"


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
