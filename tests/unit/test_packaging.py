"""Packaging promises: component import names, torch-free router/operator, a complete wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith(("torch.", "triton")):
            raise ImportError(f"{name} must not be imported here")
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.mark.parametrize(
    "module", ["tusk.router.app", "tusk.operator.main", "tusk.router.sim.cli", "tusk.cli"]
)
def test_router_and_operator_import_without_torch(module):
    code = BLOCK_TORCH + f"import {module}\nprint('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_operator_folder_does_not_shadow_the_standard_library():
    assert not (REPO / "operator" / "__init__.py").exists()
    code = "import operator, tusk.operator; print(operator.__file__); print(list(tusk.operator.__path__))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    stdlib_path, component_paths = result.stdout.splitlines()
    assert "site-packages" not in stdlib_path and not stdlib_path.startswith(str(REPO))
    assert str(REPO / "operator") in component_paths


def test_wheel_carries_every_component(tmp_path: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("tusk-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "tusk/cli.py",
        "tusk/protocol/worker.proto",
        "tusk/protocol/worker_pb2.py",
        "tusk/protocol/worker_pb2_grpc.py",
        "tusk/operator/main.py",
        "tusk/router/app.py",
        "tusk/router/policies/base.py",
        "tusk/router/sim/cli.py",
        "tusk/worker/engine.py",
        "tusk/kernels/__init__.py",
        "tusk/kvtier/client.py",
    ):
        assert required in names, required
    assert "tusk/operator/__init__.py" not in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tusk = tusk.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
