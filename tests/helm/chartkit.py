"""Shared pieces of the chart checks: where things are, the install scenarios, rendering helpers.

A module of its own (not conftest.py) so that test modules import it by a name no other test
area uses.
"""

from __future__ import annotations

import copy
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "tusk"
VALUES_DIR = Path(__file__).resolve().parent / "values"
RELEASE = "tusk"
NAMESPACE = "tusk-system"
# Oldest Kubernetes minor the chart promises (Chart.yaml kubeVersion is >=1.29); objects are
# validated against a current supported release's schemas.
KUBE_VERSION = "1.33.0"
MONITORING_API = "monitoring.coreos.com/v1"


@dataclass(frozen=True)
class Scenario:
    """One way of installing the chart: a values file plus the APIs the cluster would serve."""

    name: str
    values: tuple[str, ...] = ()
    api_versions: tuple[str, ...] = ()


SCENARIOS = [
    Scenario("defaults"),
    Scenario("managed-tier", ("managed-tier.yaml",)),
    Scenario("ingress", ("ingress.yaml",)),
    Scenario("namespaced", ("namespaced.yaml",)),
    Scenario("servicemonitor", ("servicemonitor.yaml",), (MONITORING_API,)),
    Scenario("everything", ("managed-tier.yaml", "ingress.yaml", "namespaced.yaml", "servicemonitor.yaml",
                            "autoscaling.yaml"), (MONITORING_API,)),
]  # fmt: skip
SCENARIO_IDS = [s.name for s in SCENARIOS]


@dataclass(frozen=True)
class Tools:
    helm: Path  # v4
    kubectl: Path
    helm3: Path  # v3: the chart must work with both majors

    def run(
        self, binary: Path, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(binary), *args], capture_output=True, text=True, timeout=timeout, env=_isolated_env()
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{binary.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc


def _isolated_env() -> dict[str, str]:
    """No user kubeconfig or helm state leaks into the checks."""
    home = tempfile.gettempdir()
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    return {
        **keep,
        "HOME": home,
        "KUBECONFIG": os.devnull,
        "HELM_CACHE_HOME": f"{home}/tusk-helm-test/cache",
        "HELM_CONFIG_HOME": f"{home}/tusk-helm-test/config",
        "HELM_DATA_HOME": f"{home}/tusk-helm-test/data",
    }


def template_args(scenario: Scenario, *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for name in scenario.values:
        args += ["--values", str(VALUES_DIR / name)]
    for api in scenario.api_versions:
        args += ["--api-versions", api]
    return [*args, *extra]


def parse_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


Renderer = Callable[..., list[dict[str, Any]]]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every workload object, including the helm test Pod."""
    specs = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            specs.append((f"Pod/{o['metadata']['name']}", o["spec"]))
    return specs


EXAMPLES_DIR = REPO_ROOT / "deploy" / "examples"


def close_objects(schema: Any) -> Any:
    """Copy of a structural schema where objects with declared properties reject other keys,
    as the API server's pruning would drop them."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """A copy of ``value`` with the structural schema's defaults filled in, recursively, the way
    the API server defaults a custom resource before validating it."""
    value = copy.deepcopy(value)
    _default_into(schema, value)
    return value


def _default_into(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default_into(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(value) - set(schema.get("properties", {})):
                _default_into(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_into(schema["items"], item)


def cel_violations(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Messages of every x-kubernetes-validations rule that ``value`` breaks (CEL, evaluated with
    the ``common-expression-language`` package; rules see the node as ``self``)."""
    # xds-protos ships an empty cel/__init__.py that can replace this package's: use the extension.
    from cel.cel import evaluate

    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        if evaluate(rule["rule"], {"self": value}) is not True:
            found.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                found += cel_violations(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += cel_violations(schema["items"], item, f"{path}[{i}]")
    return found
