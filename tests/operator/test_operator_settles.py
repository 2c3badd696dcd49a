"""What a real API server does that a plain emulator did not: canonical quantities on write, and
child status moving on its own. The operator settles on the first and follows the second."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from kube_emulator import canonical_quantity
from operator_harness import Cluster, OperatorThread, eventually

# Written the way users write them; the server stores 500m, 2Gi, 1536Mi, 1 and 20Gi.
NON_CANONICAL = {
    "model": {"source": "hf://org/m", "cache": {"sizeLimit": "20480Mi"}},
    "prefill": {
        "replicas": 1,
        "resources": {"requests": {"cpu": "0.5", "memory": "2048Mi"}, "limits": {"memory": "1.5Gi"}},
    },
    "decode": {"replicas": 1, "accelerator": "nvidia", "resources": {"requests": {"cpu": 1}}},
    "kvTier": {"managed": {"memory": "1024Mi"}},
}


@pytest.mark.parametrize(
    ("written", "stored"),
    [("0.5", "500m"), ("2048Mi", "2Gi"), ("1.5Gi", "1536Mi"), (1, "1"), ("1000", "1k"), ("100m", "100m")],
)
def test_emulator_stores_quantities_as_the_api_server_does(written, stored) -> None:
    assert canonical_quantity(written) == stored


async def test_non_canonical_quantities_settle_without_drift_repair(cluster: Cluster, options) -> None:
    runner = OperatorThread(replace(options, resync_seconds=0.3))
    await runner.start()
    try:
        await cluster.create_md("q", NON_CANONICAL)
        await eventually(lambda: cluster.deployment("q-prefill") and cluster.deployment("q-decode"))
        prefill = cluster.deployment("q-prefill")["spec"]["template"]["spec"]["containers"][0]
        assert prefill["resources"]["requests"] == {
            "cpu": "500m",
            "memory": "2Gi",
            "ephemeral-storage": "20Gi",
        }
        await eventually(lambda: (cluster.md("q").get("status") or {}).get("conditions"), what="status")
        patches_before = _child_patches(cluster)
        # Many resync passes (0.3 s each): none may patch a child or report a drift.
        await asyncio.sleep(3)
    finally:
        await runner.stop()
    assert _child_patches(cluster) == patches_before
    assert not [e for e in cluster.events("q") if e["reason"] == "DriftRepaired"]


def _child_patches(cluster: Cluster) -> int:
    return sum(
        1
        for action, resource, _, _, _ in cluster.emulator.writes
        if action == "UPDATE" and "modeldeployments" not in resource and "events" not in resource
    )


async def test_status_follows_rollouts_and_failing_pods_without_a_resync(cluster: Cluster, options) -> None:
    runner = OperatorThread(replace(options, resync_seconds=3600))  # only the watches can update status
    await runner.start()
    try:
        await cluster.create_md("w", {"model": {"source": "tiny"}, "decode": {"replicas": 1}})
        deployment = await eventually(lambda: cluster.deployment("w-decode"))
        await eventually(
            lambda: (cluster.condition("w", "Ready") or {}).get("reason") == "NoDecodeWorkerReady"
        )

        # The Deployment controller reports the rollout through the API: status follows in seconds.
        await cluster.request(
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/w-decode/status",
            {
                "status": {
                    "observedGeneration": deployment["metadata"]["generation"],
                    **dict.fromkeys(("replicas", "readyReplicas", "updatedReplicas", "availableReplicas"), 1),
                }
            },
            "application/merge-patch+json",
        )
        await eventually(
            lambda: cluster.condition("w", "Ready")["status"] == "True", what="Ready from the watch"
        )
        assert cluster.md("w")["status"]["decode"]["ready"] == "1/1"

        # A worker pod that cannot pull its image: Degraded with the kubelet's reason, and an Event.
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "w-decode-7c9d", "labels": labels},
            "spec": {"containers": [{"name": "worker", "image": "ghcr.io/nope:1"}]},
            "status": {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "worker",
                        "ready": False,
                        "state": {
                            "waiting": {
                                "reason": "ImagePullBackOff",
                                "message": 'Back-off pulling image "ghcr.io/nope:1"',
                            }
                        },
                    }
                ],
            },
        }
        await cluster.create("/api/v1/namespaces/default/pods", pod)
        await eventually(
            lambda: cluster.condition("w", "Degraded")["reason"] == "ImagePullBackOff", what="Degraded"
        )
        assert "w-decode-7c9d" in cluster.condition("w", "Degraded")["message"]
        assert cluster.md("w")["status"]["phase"] == "Degraded"
        await eventually(
            lambda: any(
                e["reason"] == "ImagePullBackOff" and e["type"] == "Warning" for e in cluster.events("w")
            ),
            what="Warning event",
        )
        # A failing pod does not stop the fix from rolling out: the spec is still applied.
        await cluster.patch_md("w", {"spec": {"image": "ghcr.io/fixed:1"}})
        await eventually(
            lambda: (
                cluster.deployment("w-decode")["spec"]["template"]["spec"]["containers"][0]["image"]
                == "ghcr.io/fixed:1"
            ),
            what="fix applied while degraded",
        )
        # The pod recovers: so does the model.
        await cluster.request(
            "PATCH",
            "/api/v1/namespaces/default/pods/w-decode-7c9d",
            {
                "status": {
                    "phase": "Running",
                    "containerStatuses": [{"name": "worker", "state": {"running": {}}}],
                }
            },
            "application/merge-patch+json",
        )
        await eventually(lambda: cluster.condition("w", "Degraded")["status"] == "False", what="recovered")
    finally:
        await runner.stop()
