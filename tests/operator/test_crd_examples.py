"""Every shipped example as a real API server would take it: admitted, defaulted, CEL rules held.

The committed chart CRD is what users install, so it is the one checked here (test_chart_sync.py
proves it equals the generated one).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from crd_server_model import admit, crd_errors, nodes, storage_schema
from kubernetes.utils import parse_quantity
from tusk.operator import manifests
from tusk.operator.spec import QUANTITY_PATTERN, parse_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
CHART_CRD = yaml.safe_load((REPO / "helm" / "tusk" / "crds" / manifests.CRD_FILENAME).read_text())


def _modeldeployments(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "ModelDeployment"]


def _quantities(schema: dict, value, path: str = ""):
    """(path, value) of every quantity-typed value in an object, found through the schema."""
    if schema.get("pattern") == QUANTITY_PATTERN:
        yield path, value
    elif isinstance(value, dict):
        for key, child in value.items():
            sub = (schema.get("properties") or {}).get(key) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                yield from _quantities(sub, child, f"{path}.{key}")


def test_the_chart_crd_is_accepted() -> None:
    assert crd_errors(CHART_CRD) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_admitted_and_parses_as_stored(path: Path) -> None:
    mds = _modeldeployments(path)
    assert mds, f"{path.name} holds no ModelDeployment"
    for md in mds:
        stored = admit(CHART_CRD, md)
        # The operator reads what the server stored; its own defaults must give the same spec.
        assert parse_spec(stored["spec"]) == parse_spec(md["spec"])
        # Quantities are valid Kubernetes quantities (parse as the server parses them).
        found = list(_quantities(storage_schema(CHART_CRD), stored))
        assert any(p.endswith(".memory") for p, _ in found)
        for where, value in found:
            assert parse_quantity(value) >= 0, where


def test_quantity_fields_are_found_through_the_schema() -> None:
    """Guards the walk above: it must see the nested resource maps, not only top-level fields."""
    paths = {
        path for path, node in nodes(storage_schema(CHART_CRD)) if node.get("pattern") == QUANTITY_PATTERN
    }
    assert ".spec.decode.resources.limits[*]" in paths and ".spec.kvTier.managed.memory" in paths


def test_crd_generation_needs_no_torch() -> None:
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith(('torch.', 'triton')):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from tusk.operator import manifests\n"
        "manifests.crd()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
