""".github/workflows/images.yml, checked offline (it only runs on GitHub): valid against the GitHub
workflow schema (check-jsonschema's vendored copy), its shell steps shellcheck-clean and executed
where they can be, and publishing exactly the images scripts/images.sh builds, under the names the
chart and the operator use."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chartkit import CHART, REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "images.yml"
IMAGES_SH = REPO_ROOT / "scripts" / "images.sh"


def _workflow() -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub reads it as "on".
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True)
    return data


def test_valid_github_workflow():
    check = Path(sys.executable).parent / "check-jsonschema"
    proc = subprocess.run(
        [str(check), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_publishes_on_version_tags_only_with_least_privilege():
    workflow = _workflow()
    assert workflow["on"]["push"] == {"tags": ["v*.*.*"]}
    assert workflow["permissions"] == {"contents": "read"}
    jobs = workflow["jobs"]
    assert jobs["image"]["permissions"] == {"contents": "read", "packages": "write"}
    assert "permissions" not in jobs["check"]
    for job in jobs.values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), f"{step['uses']}: pin a release"


def test_publishes_exactly_the_images_images_sh_builds_under_the_shared_names():
    matrix = _workflow()["jobs"]["image"]["strategy"]["matrix"]["include"]
    all_images = re.search(r"^ALL_IMAGES=\((.*)\)$", IMAGES_SH.read_text(), re.M).group(1).split()
    assert [m["image"] for m in matrix] == all_images
    for entry in matrix:
        assert (REPO_ROOT / entry["dockerfile"]).is_file()
        if entry["image"].startswith("worker-"):
            assert entry["dockerfile"] == "deploy/docker/worker.Dockerfile"
            assert entry["accelerator"] == entry["image"].removeprefix("worker-")
        else:
            assert entry["dockerfile"] == f"deploy/docker/{entry['image']}.Dockerfile"
            assert entry["accelerator"] == ""
        platforms = entry["platforms"].split(",")
        assert "linux/amd64" in platforms
        if entry["image"] in ("operator", "router", "worker-cpu"):
            assert "linux/arm64" in platforms, "multi-arch where the wheels exist"
    workflow = _workflow()
    build = next(
        s for s in workflow["jobs"]["image"]["steps"] if s.get("uses", "").startswith("docker/build-push")
    )
    assert (
        build["with"]["tags"]
        == "${{ env.REGISTRY }}/tusk-${{ matrix.image }}:${{ needs.check.outputs.version }}"
    )
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"{workflow['env']['REGISTRY']}/tusk-router" == values["router"]["image"]["repository"]
    assert 'REGISTRY="${TUSK_IMAGE_REGISTRY:-ghcr.io/tusk-dev}"' in IMAGES_SH.read_text()
    assert build["with"]["push"] is True


def _run_steps() -> list[tuple[str, str]]:
    steps = []
    for name, job in _workflow()["jobs"].items():
        for i, step in enumerate(job["steps"]):
            if "run" in step:
                steps.append((f"{name}[{i}]", step["run"]))
    return steps


@pytest.mark.parametrize(("where", "script"), _run_steps(), ids=[w for w, _ in _run_steps()])
def test_run_steps_are_shellcheck_clean(where, script):
    # GitHub substitutes ${{ ... }} before bash sees the script.
    text = "#!/usr/bin/env bash\nset -euo pipefail\n" + re.sub(r"\$\{\{[^}]*\}\}", "X", script)
    beside_python = Path(sys.executable).parent / "shellcheck"
    proc = subprocess.run(
        [str(beside_python), "--severity=style", "-"], input=text, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(("ref", "ok"), [("v0.1.0", True), ("v9.9.9", False)])
def test_version_step_accepts_only_the_charts_app_version(tmp_path, ref, ok):
    (step,) = [s for s in _workflow()["jobs"]["check"]["steps"] if s.get("id") == "version"]
    output = tmp_path / "output"
    env = {
        "GITHUB_REF_NAME": ref,
        "GITHUB_REF_TYPE": "tag",
        "GITHUB_OUTPUT": str(output),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", step["run"]],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    if ok:
        assert ref == f"v{app_version}", "keep this case on the chart's appVersion"
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert output.read_text() == f"version={app_version}\n"
    else:
        assert proc.returncode == 1 and "does not match" in proc.stdout
