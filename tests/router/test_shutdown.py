"""The router process stops well within the chart's grace period (45 s) while its Kubernetes
watches are parked in their long polls on an API server that never ends them."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, urlparse

import httpx

from tusk.config import RouterConfig

GRACE_S = 45  # terminationGracePeriodSeconds of the chart's router pods


class _HangingApiServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.watches: list[str] = []
        self.closing = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HangingApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        if parse_qs(url.query).get("watch") == ["true"]:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            self.server.watches.append(url.path)
            self.server.closing.wait(120)  # a long poll that outlives any grace period
            return
        body = json.dumps({"kind": "List", "metadata": {"resourceVersion": "7"}, "items": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_router_stops_within_its_grace_period_with_watches_open(tmp_path) -> None:
    api = _HangingApiServer()
    threading.Thread(target=api.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    server = f"http://127.0.0.1:{api.server_address[1]}"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(kubeconfig)
    config = RouterConfig(port=0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tusk.router", "--config-json", config.model_dump_json(), "--kubernetes"]
        + ["--namespace", "ml"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready"
        deadline = time.monotonic() + 30
        while len(api.watches) < 2:  # pods and modeldeployments, both parked
            assert time.monotonic() < deadline, f"the router never watched: {api.watches}"
            time.sleep(0.05)
        assert sorted(api.watches) == [
            "/api/v1/namespaces/ml/pods",
            "/apis/tusk.dev/v1alpha1/namespaces/ml/modeldeployments",
        ]
        assert httpx.get(f"http://{ready['address']}/health/live").status_code == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(GRACE_S) == 0
        # Generous against a busy machine; the watch timeout (minutes) is what it must not wait for.
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        api.closing.set()
        api.shutdown()
