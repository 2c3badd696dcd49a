"""The CPU images that scripts/images.sh built, run for real: the CLI in each, and a worker plus a
router container serving the official ``openai`` client on loopback, both locked down as a
restricted Kubernetes pod would be (uid 10001, read-only root, no capabilities, no new privileges).

The images must exist (CI builds them in .ci/run before the tests). Outside CI a missing image skips
these tests; with CI=true it fails them, so CI can never pass without building and running them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REGISTRY = os.environ.get("TUSK_IMAGE_REGISTRY", "ghcr.io/tusk-dev")
TAG = os.environ.get("TUSK_IMAGE_TAG", "dev")
IMAGES = {name: f"{REGISTRY}/tusk-{name}:{TAG}" for name in ("operator", "router", "worker-cpu")}
UID = "10001"
# What the chart's securityContexts ask of every pod (restricted Pod Security Standard).
LOCKED_DOWN = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", UID)
START_TIMEOUT_S = 240


def _engine() -> str | None:
    """The engine scripts/images.sh would use: TUSK_CONTAINER_ENGINE, a running docker, or podman."""
    chosen = os.environ.get("TUSK_CONTAINER_ENGINE")
    if chosen:
        return chosen if shutil.which(chosen) else None
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    ):
        return "docker"
    return "podman" if shutil.which("podman") else None


def _run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def engine() -> str:
    found = _engine()
    missing = (
        list(IMAGES.values())
        if found is None
        else [i for i in IMAGES.values() if _run(found, "image", "inspect", i, check=False).returncode != 0]
    )
    if missing:
        reason = f"images not built ({', '.join(missing)}); run scripts/images.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must build and run the images: {reason}")
        pytest.skip(reason)
    return found


def test_image_sizes_are_reported(engine):
    sizes = {}
    for name, image in IMAGES.items():
        size = int(_run(engine, "image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
        sizes[name] = size
    # Printed past pytest's capture, so the sizes are in the CI log.
    sys.__stderr__.write(
        "\nimage sizes: " + ", ".join(f"{IMAGES[n]} {s / 1e6:.0f} MB" for n, s in sizes.items()) + "\n"
    )
    assert sizes["router"] < sizes["worker-cpu"], "the router image must not carry torch"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_the_cli_runs_locked_down_as_uid_10001(engine, name):
    image = IMAGES[name]
    config = json.loads(_run(engine, "image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == f"{UID}:{UID}" and config["Entrypoint"] == ["tusk"]
    assert not [e for e in config.get("Env") or [] if e.startswith(("PIP_CERT=", "SSL_CERT_FILE="))]
    help_text = _run(engine, "run", "--rm", "--network", "none", *LOCKED_DOWN, image, "--help").stdout
    assert "commands:" in help_text and "worker" in help_text and "operator" in help_text
    uid = _run(engine, "run", "--rm", "--network", "none", *LOCKED_DOWN, "--entrypoint", "id", image, "-u")
    assert uid.stdout.strip() == UID
    # The build's CA bundle was a secret mount: nothing of it is left in the image.
    left = _run(
        engine, "run", "--rm", "--network", "none", "--entrypoint", "ls", image, "/run/secrets", check=False
    )
    assert "ca-bundle" not in left.stdout


def _free_port() -> int:
    from tusk.kvserver import free_port

    return free_port()


class Container:
    """A detached container, removed (with its logs shown on failure) when the test ends."""

    def __init__(
        self, engine: str, name: str, image: str, *args: str, run_args: tuple[str, ...] = ()
    ) -> None:
        self.engine = engine
        self.name = f"tusk-test-{name}-{uuid.uuid4().hex[:8]}"
        _run(
            engine,
            "run",
            "-d",
            "--name",
            self.name,
            "--network",
            "host",
            *LOCKED_DOWN,
            *run_args,
            image,
            *args,
        )

    def logs(self) -> str:
        proc = _run(self.engine, "logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def running(self) -> bool:
        proc = _run(self.engine, "inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def remove(self) -> None:
        _run(self.engine, "rm", "-f", "-t", "5", self.name, check=False, timeout=60)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model's tokenizer files, readable by uid 10001, for the router (which has no torch)."""
    folder = tmp_path_factory.mktemp("router-tokenizer")
    for path in tiny_model.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy(path, folder / path.name)
            (folder / path.name).chmod(0o644)
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def serving(engine: str, tokenizer_dir: Path) -> Iterator[str]:
    """A worker container and a router container on loopback; yields the router's /v1 URL."""
    import httpx

    worker_port, router_port = _free_port(), _free_port()
    worker_config = {
        "model": "tiny",
        "host": "127.0.0.1",
        "port": worker_port,
        "engine": {"dtype": "float32", "device": "cpu", "max_model_len": 512},
    }
    router_config = {
        "host": "127.0.0.1",
        "port": router_port,
        "models": [
            {
                "name": "tiny",
                "tokenizer": "/models/tiny",
                "workers": [{"address": f"127.0.0.1:{worker_port}"}],
            }
        ],
    }
    # A writable cache for the tiny model owned by the container's user (the pod's emptyDir + fsGroup):
    # podman spells that U, docker passes uid/gid through to tmpfs.
    owner = "U" if engine == "podman" else f"uid={UID},gid={UID}"
    cache = ("--tmpfs", f"/var/cache/tusk:rw,size=512m,{owner}", "--tmpfs", f"/tmp:rw,size=256m,{owner}")
    containers: list[Container] = []
    try:
        containers.append(
            Container(engine, "worker", IMAGES["worker-cpu"], "worker", "--config-json", json.dumps(worker_config),
                      run_args=(*cache, "--env", "OMP_NUM_THREADS=1"))
        )  # fmt: skip
        containers.append(
            Container(engine, "router", IMAGES["router"], "router", "--config-json", json.dumps(router_config),
                      run_args=("--tmpfs", f"/tmp:rw,size=64m,{owner}", "--volume", f"{tokenizer_dir}:/models/tiny:ro"))
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for c in containers:
                assert c.running(), f"{c.name} exited:\n{c.logs()}"
            try:
                if httpx.get(f"http://127.0.0.1:{router_port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "\n".join(f"{c.name}:\n{c.logs()}" for c in containers)
            time.sleep(1)
        yield f"http://127.0.0.1:{router_port}/v1"
    finally:
        for c in containers:
            c.remove()


def test_openai_client_gets_a_chat_completion_from_the_containers(serving):
    import openai

    client = openai.OpenAI(base_url=serving, api_key="unused", timeout=120, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert reply.model == "tiny"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens >= 1


def test_openai_client_streams_a_chat_completion_from_the_containers(serving):
    import openai

    client = openai.OpenAI(base_url=serving, api_key="unused", timeout=120, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"]), finishes
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text, "no content streamed"
