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


def test_config_file_json_or_yaml_and_flag_overrides(tmp_path) -> None:
    from tusk.router.app import _parse_args, load_config

    as_json = tmp_path / "router.json"
    as_json.write_text('{"port": 9001, "max_queue": 7, "routing": {"policy": "least_request"}}')
    as_yaml = tmp_path / "router.yaml"
    as_yaml.write_text("port: 9002\napi_keys: [k1]\n")
    cfg = load_config(_parse_args(["--config", str(as_json), "--port", "0", "--host", "0.0.0.0"]))
    assert (cfg.port, cfg.host, cfg.max_queue, cfg.routing.policy) == (0, "0.0.0.0", 7, "least_request")
    assert load_config(_parse_args(["--config", str(as_yaml)])).api_keys == ["k1"]
