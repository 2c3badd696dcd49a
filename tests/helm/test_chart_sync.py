"""The chart's CRDs and operator RBAC are exactly what the operator's code generates.

The chart keeps no hand-written copy: `python -m tusk.operator.manifests write-chart helm/tusk`
writes them, and these tests fail when the operator changes and the chart was not regenerated, or
when the templates grant anything other than the generated rules.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import yaml
from chartkit import CHART, NAMESPACE, RELEASE, SCENARIOS, by_kind
from tusk.operator import manifests

REGENERATE = "run: python -m tusk.operator.manifests write-chart helm/tusk"
# Cluster-scoped names carry the release namespace, so two releases never share one.
OPERATOR_CLUSTER_NAME = f"{NAMESPACE}-{RELEASE}-operator"


def test_committed_chart_files_equal_what_the_operator_generates(tmp_path):
    written = manifests.write_chart(tmp_path)
    assert written, "write_chart wrote nothing"
    for path in written:
        relative = path.relative_to(tmp_path)
        committed = CHART / relative
        assert committed.is_file(), f"{relative} is missing from the chart; {REGENERATE}"
        assert committed.read_text() == path.read_text(), f"{relative} is stale; {REGENERATE}"
    generated_crds = {p.name for p in (tmp_path / "crds").iterdir()}
    extra = {p.name for p in (CHART / "crds").iterdir()} - generated_crds
    assert not extra, f"hand-written CRDs in the chart: {sorted(extra)}"


def _grants(rules) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, so rule grouping and order do not matter."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out[(group, resource)] |= set(rule["verbs"])
    return dict(out)


def _operator_subject(binding) -> bool:
    return binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-operator", "namespace": "tusk-system"}
    ]


def test_all_namespaces_operator_gets_exactly_the_generated_rules(render):
    objects = render(SCENARIOS[0])
    roles = [r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"] == OPERATOR_CLUSTER_NAME]
    assert len(roles) == 1
    assert roles[0]["rules"] == manifests.rbac_rules()
    assert not [r for r in by_kind(objects, "Role") if r["metadata"]["name"] == f"{RELEASE}-operator"], (
        "an all-namespaces install needs no Roles for the operator's rules"
    )
    (binding,) = [
        b for b in by_kind(objects, "ClusterRoleBinding") if b["metadata"]["name"] == OPERATOR_CLUSTER_NAME
    ]
    assert binding["roleRef"]["name"] == OPERATOR_CLUSTER_NAME and _operator_subject(binding)


def test_namespaced_operator_splits_the_generated_rules_without_widening_them(render):
    objects = render(SCENARIOS[3])
    expected = _grants(manifests.rbac_rules())
    (cluster_role,) = [
        r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"] == OPERATOR_CLUSTER_NAME
    ]
    cluster = _grants(cluster_role["rules"])
    # Only cluster-scoped resources stay cluster-wide.
    assert {resource for _, resource in cluster} <= {
        "nodes",
        "namespaces",
        "customresourcedefinitions",
        "clusterkopfpeerings",
    }
    roles = [r for r in by_kind(objects, "Role") if r["metadata"]["name"] == f"{RELEASE}-operator"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        union = defaultdict(set, {k: set(v) for k, v in cluster.items()})
        for key, verbs in _grants(role["rules"]).items():
            union[key] |= verbs
        assert dict(union) == expected
    bindings = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["name"] == f"{RELEASE}-operator"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(_operator_subject(b) and b["roleRef"]["kind"] == "Role" for b in bindings)


@pytest.mark.parametrize("scenario", [SCENARIOS[0], SCENARIOS[3]], ids=["all-namespaces", "namespaced"])
def test_router_can_only_list_and_watch_pods_and_modeldeployments_and_get_owners(render, scenario):
    objects = render(scenario)
    roles = [
        r
        for r in by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
        if r["metadata"]["name"] in (f"{RELEASE}-router", f"{NAMESPACE}-{RELEASE}-router")
    ]
    assert len(roles) == 1
    for role in roles:
        grants = _grants(role["rules"])
        assert grants[("", "pods")] == {"list", "watch"}
        assert grants[("tusk.dev", "modeldeployments")] == {"list", "watch"}
        assert grants[("apps", "replicasets")] == grants[("apps", "deployments")] == {"get"}  # owner chain
        assert set(grants) == {
            ("", "pods"),
            ("tusk.dev", "modeldeployments"),
            ("apps", "replicasets"),
            ("apps", "deployments"),
        }
        assert all(verbs <= {"get", "list", "watch"} for verbs in grants.values()), "the router only reads"
        assert ("", "secrets") not in grants


def test_rbac_file_is_a_plain_rule_list():
    rules = yaml.safe_load((CHART / "files" / "operator-rbac-rules.yaml").read_text())
    assert isinstance(rules, list) and rules
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules), "no wildcards"
