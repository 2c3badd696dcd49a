"""What the chart does to a cluster over time: a second release beside the first, upgrades that turn
autoscaling on, node drains, operator high availability and `helm test` with any model."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from chartkit import (
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    SCENARIOS,
    Scenario,
    by_kind,
    one,
    pod_specs,
    template_args,
)

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "CustomResourceDefinition"}


def _render_in(tools, namespace: str, scenario: Scenario, *extra: str) -> list[dict[str, Any]]:
    from chartkit import parse_documents

    args = template_args(scenario, *extra)
    args[args.index("--namespace") + 1] = namespace
    return parse_documents(tools.run(tools.helm, *args).stdout)


@pytest.mark.parametrize("scenario", [SCENARIOS[0], SCENARIOS[3]], ids=["all-namespaces", "namespaced"])
def test_a_second_release_in_another_namespace_shares_no_cluster_scoped_name(tools, scenario):
    first = _render_in(tools, "team-x", scenario)
    second = _render_in(tools, "team-y", scenario)

    def names(objects):
        return {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] in CLUSTER_SCOPED}

    assert names(first) and not names(first) & names(second)
    for objects, namespace in ((first, "team-x"), (second, "team-y")):
        roles = {r["metadata"]["name"] for r in by_kind(objects, "ClusterRole")}
        for binding in by_kind(objects, "ClusterRoleBinding"):
            # Each binding grants its own release's role to its own release's service account.
            assert binding["roleRef"]["name"] in roles
            assert {s["namespace"] for s in binding["subjects"]} == {namespace}
            assert binding["metadata"]["name"].startswith(f"{namespace}-")


def _operator(objects) -> dict[str, Any]:
    return one(objects, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]


def _lease_role(objects) -> list[dict[str, Any]]:
    return [
        r for r in by_kind(objects, "Role") if r["metadata"]["name"] == f"{RELEASE}-operator-leader-election"
    ]


@pytest.mark.parametrize(
    ("settings", "elects"),
    [
        ((), True),
        (("--set", "operator.leaderElection.enabled=false"), False),
        (("--set", "operator.leaderElection.enabled=false", "--set", "operator.replicas=2"), True),
    ],
    ids=["default", "single-replica-off", "standbys-force-it"],
)
def test_operator_leader_election_flag_and_lease_rbac(render, settings, elects):
    objects = render(SCENARIOS[0], *settings)
    args = _operator(objects)["args"]
    assert ("--leader-elect" in args) is elects
    # Two releases in one namespace never share a Lease.
    assert (f"--leader-election-name={RELEASE}-operator" in args) is elects
    roles = _lease_role(objects)
    if not elects:
        assert not roles
        return
    (role,) = roles
    assert role["metadata"]["namespace"] == NAMESPACE, "the Lease lives in the release namespace"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]
    (binding,) = [
        b for b in by_kind(objects, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]
    ]
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-operator", "namespace": NAMESPACE}
    ]
    # No cluster-wide grant on leases.
    for cluster_role in by_kind(objects, "ClusterRole"):
        assert not [r for r in cluster_role["rules"] if "leases" in r["resources"]]


def test_operator_probes_liveness_on_healthz_and_readiness_on_readyz(render):
    container = _operator(render(SCENARIOS[0]))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def _router_replicas(objects) -> int:
    return one(objects, "Deployment", f"{RELEASE}-router")["spec"]["replicas"]


def _router_pdb(objects) -> list[dict[str, Any]]:
    return [
        p for p in by_kind(objects, "PodDisruptionBudget") if p["metadata"]["name"] == f"{RELEASE}-router"
    ]


def test_autoscaling_first_install_starts_min_replicas(render):
    objects = render(
        SCENARIOS[0], "--set", "router.autoscaling.enabled=true", "--set", "router.autoscaling.minReplicas=3"
    )
    assert _router_replicas(objects) == 3
    assert one(objects, "HorizontalPodAutoscaler", f"{RELEASE}-router")["spec"]["minReplicas"] == 3


@pytest.mark.parametrize(
    ("settings", "rendered"),
    [
        (("--set", "router.replicas=1"), False),
        (("--set", "router.replicas=2"), True),
        (("--set", "router.replicas=2", "--set", "router.podDisruptionBudget.minAvailable=2"), False),
        (("--set", "router.replicas=3", "--set-string", "router.podDisruptionBudget.minAvailable=50%"), True),
        (("--set", "router.replicas=2", "--set-string", "router.podDisruptionBudget.minAvailable=60%"), False),
        (("--set", "router.replicas=1", "--set", "router.autoscaling.enabled=true",
          "--set", "router.autoscaling.minReplicas=1"), False),
        (("--set", "router.replicas=1", "--set", "router.autoscaling.enabled=true"), True),
    ],
    ids=["one", "two", "min-equals-replicas", "half-of-three", "60pct-of-two", "hpa-min-1", "hpa-min-2"],
)  # fmt: skip
def test_router_pdb_never_blocks_a_node_drain(render, settings, rendered):
    objects = render(SCENARIOS[0], *settings)
    pdbs = _router_pdb(objects)
    assert bool(pdbs) is rendered
    for pdb in pdbs:
        min_available = pdb["spec"]["minAvailable"]
        replicas = _router_replicas(objects)
        if isinstance(min_available, str):
            min_available = -(-replicas * int(min_available.rstrip("%")) // 100)
        assert min_available < replicas, "at least one router pod may always be evicted"


def _load_pod_security():
    """The restricted Pod Security checker the operator's tests use for its own pods."""
    path = REPO_ROOT / "tests" / "operator" / "pod_security.py"
    spec = importlib.util.spec_from_file_location("tusk_pod_security", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("values", [(), ("managed-tier.yaml", "ingress.yaml", "namespaced.yaml")])
def test_every_chart_pod_passes_restricted_pod_security(render, values):
    checker = _load_pod_security()
    objects = render(Scenario("restricted", values), "--set", "router.apiKeys.existingSecret=keys")
    specs = pod_specs(objects)
    assert len(specs) >= 3
    for name, spec in specs:
        assert checker.restricted_violations({"spec": spec}) == [], name


# --- `helm test` with any model ---------------------------------------------------------------


def _test_pod_env(render, *extra: str) -> dict[str, str]:
    pod = one(render(SCENARIOS[0], *extra), "Pod", f"{RELEASE}-test-chat")
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_helm_test_asks_the_router_which_model_by_default(render):
    env = _test_pod_env(render)
    assert env["MODEL"] == ""
    assert env["BASE_URL"] == f"http://{RELEASE}-router.{NAMESPACE}.svc:80/v1"
    assert _test_pod_env(render, "--set", "tests.model=llama")["MODEL"] == "llama"


def test_kind_values_still_name_the_tiny_model():
    import yaml

    values = yaml.safe_load((REPO_ROOT / "deploy" / "kind" / "values-kind.yaml").read_text())
    assert values["tests"]["model"] == "tiny"
