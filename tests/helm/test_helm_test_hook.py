"""The `helm test` Pod's script, run here with the real curl against a local HTTP stand-in for the
router, so its pass/fail logic, model discovery and auth header are exercised, not just rendered."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from chartkit import RELEASE, SCENARIOS, one

ANSWER = {
    "id": "x",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
}


MODELS = {
    "object": "list",
    "data": [{"id": "llama-3.1-8b", "object": "model"}, {"id": "tiny", "object": "model"}],
}


class FakeRouter:
    def __init__(self, status: int, body: dict, models: dict | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        self.model_requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.model_requests += 1
                self._answer(200 if self.path == "/v1/models" else 404, models or MODELS)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append((self.path, dict(self.headers), json.loads(self.rfile.read(length))))
                self._answer(status, body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeRouter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _hook(render, *extra: str) -> tuple[str, dict[str, str]]:
    pod = one(render(SCENARIOS[0], *extra), "Pod", f"{RELEASE}-test-chat")
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-ec"]
    return container["args"][0], {e["name"]: e["value"] for e in container["env"]}


def _run(script: str, env: dict[str, str], url: str) -> subprocess.CompletedProcess:
    curl = shutil.which("curl")
    assert curl, "curl is needed to run the helm test script"
    environment = {**env, "BASE_URL": url, "PATH": f"{Path(curl).parent}:/usr/bin:/bin"}
    return subprocess.run(
        ["/bin/sh", "-ec", script], env=environment, capture_output=True, text=True, timeout=60
    )


def test_script_is_shellcheck_clean_posix_sh(render):
    script, _ = _hook(render)
    shellcheck = Path(sys.executable).parent / "shellcheck"
    proc = subprocess.run(
        [str(shellcheck) if shellcheck.exists() else "shellcheck", "-s", "sh", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout


def test_passes_on_a_chat_completion_with_the_first_listed_model(render):
    script, env = _hook(render)
    with FakeRouter(200, ANSWER) as router:
        proc = _run(script, env, router.url)
    assert proc.returncode == 0, proc.stderr
    assert router.model_requests == 1
    ((path, headers, body),) = router.requests
    assert path == "/v1/chat/completions"
    assert headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers
    assert body["model"] == "llama-3.1-8b" and body["max_tokens"] == 8
    assert body["messages"][0]["role"] == "user"


def test_a_configured_model_is_used_without_asking(render):
    script, env = _hook(render, "--set", "tests.model=tiny")
    with FakeRouter(200, ANSWER) as router:
        proc = _run(script, env, router.url)
    assert proc.returncode == 0, proc.stderr
    assert router.model_requests == 0
    assert router.requests[0][2]["model"] == "tiny"


def test_fails_when_the_router_lists_no_model(render):
    script, env = _hook(render)
    env["MODEL_TRIES"] = "2"
    with FakeRouter(200, ANSWER, models={"object": "list", "data": []}) as router:
        proc = _run(script, env, router.url)
    assert proc.returncode != 0
    assert "lists no model" in proc.stderr
    assert router.model_requests == 2 and not router.requests


@pytest.mark.parametrize(
    ("status", "body"), [(200, {"object": "list", "data": []}), (404, {"error": {"code": "model_not_found"}})]
)
def test_fails_without_a_completion(render, status, body):
    script, env = _hook(render, "--set", "tests.timeoutSeconds=5", "--set", "tests.model=tiny")
    assert "--retry 20" in script
    script = script.replace("--retry 20", "--retry 0")  # retries only make a failing case slow
    with FakeRouter(status, body) as router:
        proc = _run(script, env, router.url)
    assert proc.returncode != 0
    assert router.requests


def test_sends_the_first_api_key_when_auth_is_on(render, tmp_path):
    script, env = _hook(render, "--set", "router.apiKeys.existingSecret=router-keys")
    keys = tmp_path / "key"
    keys.write_text("# rotated 2026-11\nsk-first\nsk-second\n")
    env["KEY_FILE"] = str(keys)
    with FakeRouter(200, ANSWER) as router:
        proc = _run(script, env, router.url)
    assert proc.returncode == 0, proc.stderr
    assert router.requests[0][1]["Authorization"] == "Bearer sk-first"
