"""``python -m tusk.router`` as a process: ready line, serving, SIGTERM, bad config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx

from tusk.config import ModelRoute, RouterConfig


def test_process_ready_line_health_and_sigterm(tiny_model) -> None:
    config = RouterConfig(port=0, models=[ModelRoute(name="tiny", tokenizer=str(tiny_model))])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tusk.router", "--config-json", config.model_dump_json()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and ready["models"] == ["tiny"]
        url = f"http://{ready['address']}"
        assert httpx.get(f"{url}/health/live").status_code == 200
        assert httpx.get(f"{url}/health").status_code == 503  # no workers configured
        resp = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert resp.status_code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert proc.stdout.read() == ""  # stdout stays quiet after the ready line
        logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert any(entry.get("request_id") for entry in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_config_is_one_line_error(tmp_path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "tusk.router", "--config-json", '{"port": "x"}'],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "invalid config" in bad.stderr and "Traceback" not in bad.stderr
    missing = RouterConfig(port=0, models=[ModelRoute(name="m", tokenizer=str(tmp_path))])
    proc = subprocess.run(
        [sys.executable, "-m", "tusk.router", "--config-json", missing.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "tokenizer.json" in proc.stderr and "Traceback" not in proc.stderr
