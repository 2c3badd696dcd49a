"""`tusk serve` as a user runs it: a subprocess on free ports, real workers, real Valkey, real router.

These tests exercise the whole request path (router -> prefill worker -> KV tier -> decode worker)
and the process hygiene around it: readiness, clean errors, and no orphans after SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)


@dataclass
class Served:
    process: subprocess.Popen
    url: str
    model: str
    children: list[int]


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_serve(args: list[str], env: dict[str, str], timeout: float = 300) -> Served:
    process = subprocess.Popen(
        [sys.executable, "-m", "tusk", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    line = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line or process.poll() is not None:
            break
    if not line:
        process.kill()
        raise AssertionError(f"tusk serve did not start: {process.stderr.read() if process.stderr else ''}")
    info = json.loads(line)
    assert info["event"] == "ready"
    return Served(process, info["url"], info["model"], _children_of(process.pid))


def stop_serve(served: Served) -> int:
    served.process.send_signal(signal.SIGTERM)
    code = served.process.wait(60)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in served.children) and time.monotonic() < deadline:
        time.sleep(0.1)
    return code


@pytest.fixture(scope="module")
def serve_env(tiny_model: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TUSK_CACHE_DIR"] = str(tiny_model.parent)
    return env


@pytest.fixture(scope="module")
def served(serve_env: dict[str, str]) -> Iterator[Served]:
    served = start_serve(
        ["--prefill", "1", "--decode", "1", "--num-kv-blocks", "512", "--disaggregation-threshold", "0"],
        serve_env,
    )
    yield served
    if served.process.poll() is None:
        stop_serve(served)


def test_health_and_models(served: Served):
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    models = httpx.get(f"{served.url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_streamed_chat_completion(served: Served):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        "stream": True,
    }
    chunks, done = [], False
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunks.append(json.loads(line[6:]))
    assert done
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_matches_transformers_greedy(served: Served, tiny_model: Path):
    """Disaggregated serving returns exactly what transformers' greedy generate produces."""
    transformers = pytest.importorskip("transformers")
    import torch

    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    resp = httpx.post(
        f"{served.url}/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "text_completion"
    assert data["usage"]["completion_tokens"] >= 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] == data["usage"]["prompt_tokens"]
    out = model.generate(ids, max_new_tokens=data["usage"]["completion_tokens"], do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :])
    assert data["choices"][0]["text"] == expected


def test_openai_client(served: Served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens >= 1
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        if chunk.choices
    ]
    assert "".join(pieces) == chat.choices[0].message.content
    completion = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert completion.choices[0].text is not None
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_sigterm_leaves_no_process(serve_env: dict[str, str]):
    served = start_serve(["--prefill", "0", "--decode", "1", "--num-kv-blocks", "128"], serve_env)
    assert len(served.children) >= 3, "expected kv tier, a worker and the router as children"
    assert stop_serve(served) == 0
    assert [pid for pid in served.children if _alive(pid)] == []
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        s.bind((host, int(port)))
        s.listen()


def _run_serve_expecting_error(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tusk", "serve", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_model_folder(serve_env, tmp_path):
    line = _run_serve_expecting_error(["--model", str(tmp_path / "nope"), "--port", "0"], serve_env)
    assert "does not exist" in line


def test_missing_tokenizer(serve_env, tiny_model, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(tiny_model / name)
    line = _run_serve_expecting_error(["--model", str(folder), "--port", "0"], serve_env)
    assert "tokenizer" in line


def test_port_in_use(serve_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _run_serve_expecting_error(["--port", str(port)], serve_env)
    assert f"127.0.0.1:{port}" in line


def test_unreachable_kv_tier(serve_env, unused_port):
    line = _run_serve_expecting_error(
        ["--kv-tier", f"redis://127.0.0.1:{unused_port}/0", "--port", "0"], serve_env
    )
    assert "unreachable" in line
