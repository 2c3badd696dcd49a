"""The operator's RBAC rules are the calls it makes: every call the real kopf loop sends to the
emulator is granted, and every grant is used (except the few named below that only a real
cluster or another mode exercises)."""

from __future__ import annotations

from operator_harness import Cluster, eventually
from tusk.operator import manifests

# Granted but not exercised here, each for a stated reason.
NOT_EXERCISED_HERE = {
    ("update", "tusk.dev", "modeldeployments/finalizers"): "checked by the real API server's admission",
    ("list", "", "namespaces"): "kopf observes namespaces only when namespace-scoped",
    ("watch", "", "namespaces"): "kopf observes namespaces only when namespace-scoped",
    **{
        (verb, "kopf.dev", plural): "kopf peering mode (--peering-name without --leader-elect)"
        for verb in ("get", "list", "watch", "patch")
        for plural in ("clusterkopfpeerings", "kopfpeerings")
    },
    **{
        (verb, "inference.networking.k8s.io", "inferencepools"): "test_inference_pool.py (the CRD declared)"
        for verb in ("get", "create", "patch", "delete")
    },
}
# Leader election's Lease: a Role in one namespace (the chart), not part of these rules.
LEASE_CALLS = {(verb, "coordination.k8s.io", "leases") for verb in ("get", "create", "update")}


def _granted() -> set[tuple[str, str, str]]:
    return {
        (verb, group, resource)
        for rule in manifests.rbac_rules()
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


async def test_rbac_rules_are_exactly_the_calls(cluster: Cluster, operator) -> None:
    await cluster.create(
        "/api/v1/namespaces/default/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"}, "data": {"token": "eA=="}},
    )
    spec = {
        "model": {"source": "hf://org/m", "tokenSecretRef": {"name": "hf"}},
        "prefill": {"replicas": 1, "accelerator": "nvidia"},
        "decode": {"replicas": 1},
    }
    await cluster.create_md("m1", spec)
    await eventually(lambda: cluster.deployment("m1-decode"), what="children")
    await cluster.create(
        "/api/v1/namespaces/default/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "m1-decode-abc",
                "labels": {**cluster.deployment("m1-decode")["spec"]["template"]["metadata"]["labels"]},
            },
            "spec": {"containers": [{"name": "worker", "image": "x"}]},
        },
    )
    # A new config, a finished rollout (the old ConfigMap is pruned), a drift, a pruned tier, deletion.
    await cluster.patch_md(
        "m1", {"spec": {"model": {"source": "hf://org/m@v2", "tokenSecretRef": {"name": "hf"}}}}
    )
    await eventually(
        lambda: all(
            cluster.deployment(f"m1-{r}")["metadata"]["generation"] == 2 for r in ("prefill", "decode")
        ),
        what="both roles rolled",
    )
    cluster.set_ready("m1-decode")
    cluster.set_ready("m1-prefill")
    await eventually(
        lambda: (
            len([c for c in cluster.live_objects("v1/configmaps") if c["metadata"]["name"].startswith("m1-")])
            == 2
        ),
        what="old configs pruned",
    )
    # Someone relabels one child of every kind: each is patched back.
    config = next(
        c for c in cluster.live_objects("v1/configmaps") if c["metadata"]["name"].startswith("m1-decode")
    )
    drifted = {
        ("v1/configmaps", config["metadata"]["name"]): "/api/v1/namespaces/default/configmaps",
        ("v1/services", "m1-decode"): "/api/v1/namespaces/default/services",
        (
            "policy/v1/poddisruptionbudgets",
            "m1-decode",
        ): "/apis/policy/v1/namespaces/default/poddisruptionbudgets",
        (
            "networking.k8s.io/v1/networkpolicies",
            "m1-kv",
        ): "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies",
    }
    relabel = {"metadata": {"labels": {"app.kubernetes.io/part-of": "someone-else"}}}
    for (_, name), collection in drifted.items():
        await cluster.request("PATCH", f"{collection}/{name}", relabel, "application/merge-patch+json")
    await eventually(
        lambda: all(
            cluster.get(resource, "default", name)["metadata"]["labels"]["app.kubernetes.io/part-of"]
            == "tusk"
            for resource, name in drifted
        ),
        what="drift repaired on every kind",
    )
    await cluster.patch_md(
        "m1", {"spec": {"kvTier": {"managed": None, "external": {"url": "redis://r:6379/0"}}}}
    )
    await eventually(lambda: cluster.deployment("m1-kv") is None, what="tier pruned")
    await cluster.delete_md("m1")
    await eventually(lambda: cluster.md("m1") is None, what="deleted")

    # The operator's calls only (its kubeconfig token), not the test's own requests.
    calls = {
        (verb, group, resource) for verb, group, resource, token in cluster.emulator.calls if token == "test"
    }
    granted = _granted()
    assert calls - granted - LEASE_CALLS == set(), "called without a grant"
    assert granted - calls - set(NOT_EXERCISED_HERE) == set(), "granted but never called"


def test_no_wildcards_and_no_secret_reads_beyond_metadata() -> None:
    granted = _granted()
    assert {verb for verb, group, resource in granted if resource == "secrets"} == {"get", "create"}
    assert not any("*" in part for call in granted for part in call)
    assert not {("list", "", "secrets"), ("watch", "", "secrets"), ("update", "", "secrets")} & granted
    assert not [call for call in granted if call[1] == "events.k8s.io"]
