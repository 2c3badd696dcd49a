"""The generated CRD and RBAC rules (schema validation, defaults, CEL rules, chart files).

How an API server treats the CRD (defaults, CEL rules, bad specs) is in test_crd_admission.py.
"""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import yaml
from tusk.operator import manifests, schema


def _version_schema():
    return manifests.crd()["spec"]["versions"][0]


def test_crd_is_a_valid_apiextensions_v1_object() -> None:
    crd = manifests.crd()
    kubernetes_validate.validate(crd, "1.33", strict=True)
    assert crd["metadata"]["name"] == "modeldeployments.tusk.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["md"]
    for document in manifests.peering_crds():
        kubernetes_validate.validate(document, "1.33", strict=True)


def test_subresources_and_printer_columns() -> None:
    version = _version_schema()
    assert version["subresources"]["status"] == {}
    scale = version["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.decode.replicas"
    assert scale["statusReplicasPath"] == ".status.decode.replicas"
    assert scale["labelSelectorPath"] == ".status.decode.selector"
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Ready", "Prefill", "Decode", "Model", "Age"]


def _walk(node, path=""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural_with_defaults() -> None:
    root = _version_schema()["schema"]["openAPIV3Schema"]
    nodes = dict(_walk(root))
    for path, node in nodes.items():
        # Structural: every node has a type, or says how unknown content is kept.
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), path
    defaults = {path: node["default"] for path, node in nodes.items() if "default" in node}
    assert defaults[".spec.decode.replicas"] == 1
    assert defaults[".spec.prefill.replicas"] == 0
    assert defaults[".spec.kvTier"] == {"managed": {}}
    assert defaults[".spec.kvTier.managed.maxmemoryPolicy"] == "allkeys-lru"
    assert defaults[".spec.dtype"] == "auto"
    assert defaults[".spec.paused"] is False


def test_cel_rules_have_readable_messages() -> None:
    root = _version_schema()["schema"]["openAPIV3Schema"]
    rules = {
        rule["rule"]: (path, rule)
        for path, node in _walk(root)
        for rule in node.get("x-kubernetes-validations", [])
    }
    path, rule = rules["!(has(self.managed) && has(self.external))"]
    assert path == ".spec.kvTier"
    assert rule["message"] == "kvTier: set either external (url) or managed, not both"
    path, rule = rules["!has(self.acceleratorsPerReplica) || self.acceleratorsPerReplica <= 1"]
    assert path == ".spec.decode" and rule["fieldPath"] == ".acceleratorsPerReplica"
    assert "tensor parallelism is not supported yet" in rule["message"]
    for _, rule in rules.values():
        assert rule["message"] and not rule["message"].startswith("failed")


def test_crd_is_only_in_the_tusk_category() -> None:
    assert manifests.crd()["spec"]["names"]["categories"] == ["tusk"]


def test_rbac_is_least_privilege() -> None:
    rules = manifests.rbac_rules()
    flat = {
        (group, resource): set(rule["verbs"])
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert flat["", "secrets"] == {"get", "create"}  # metadata-only checks; the tier password
    assert flat["", "nodes"] == {"list"}
    assert "delete" not in flat[schema.GROUP, schema.PLURAL]
    assert flat["apps", "deployments"] >= {"get", "create", "patch", "delete"}
    assert all("*" not in verbs for verbs in flat.values())
    assert all("*" not in rule["resources"] and "*" not in rule["apiGroups"] for rule in rules)


def test_write_chart_cli(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tusk.operator.manifests", "write-chart", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "modeldeployments.tusk.dev.yaml" in out.stdout
    crd = yaml.safe_load((tmp_path / "crds" / "modeldeployments.tusk.dev.yaml").read_text())
    assert crd == manifests.crd()
    rules = yaml.safe_load((tmp_path / "files" / "operator-rbac-rules.yaml").read_text())
    assert rules == manifests.rbac_rules()
    peering = list(yaml.safe_load_all((tmp_path / "crds" / "kopf-peering.yaml").read_text()))
    assert [d["metadata"]["name"] for d in peering] == [
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ]
