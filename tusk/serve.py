"""``tusk serve``: the whole request path on one machine, as real processes.

Order matters and mirrors a cluster: the KV tier first (workers connect to it), then prefill and
decode workers (each announces its gRPC address), then the router pointed at them. The command
returns only when the router answers ``/health``, prints the URL, and from then on owns every
child: Ctrl-C or SIGTERM stops them all, and a child that dies takes the deployment down with a
one-line reason rather than leaving a half-working server behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import ValidationError

from tusk.config import (
    EngineConfig,
    KVTierConfig,
    ModelRoute,
    Role,
    RouterConfig,
    RoutingConfig,
    ServeConfig,
    WorkerConfig,
    WorkerEndpoint,
)
from tusk.model_source import ModelSourceError, ResolvedModel, resolve_model
from tusk.supervisor import Child, ChildFailed, child_env, python_module_argv, stop_all


class ServeError(RuntimeError):
    """Anything that stops ``tusk serve`` from starting; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tusk serve", description="Run router, workers and a KV tier locally.")
    p.add_argument(
        "--model", default="tiny", help="tiny (default), a local HF folder, hf://org/name or a .gguf file"
    )
    p.add_argument("--served-name", default=None, help="name in /v1/models (default: folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="router HTTP port (0 = any free port)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0 = aggregated serving)")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--kv-tier", default=None, help="use this Redis URL instead of an embedded server")
    p.add_argument("--kv-tier-maxmemory", default="512mb")
    p.add_argument("--policy", default="cost", help="routing policy")
    p.add_argument(
        "--disaggregation-threshold",
        type=int,
        default=None,
        help="fixed uncached-token threshold for splitting prefill from decode (default: tuned online)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--log-dir", type=Path, default=None, help="where child logs go (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument(
        "--gateway",
        choices=["envoy"],
        default=None,
        help="also run a real Envoy before the workers' OpenAI HTTP APIs, tusk as its endpoint picker",
    )
    p.add_argument("--gateway-port", type=int, default=0, help="Envoy's port (0 = any free port)")
    return p


def _config_from_args(args: argparse.Namespace) -> ServeConfig:
    try:
        return ServeConfig(
            model=args.model,
            host=args.host,
            port=args.port,
            prefill=args.prefill,
            decode=args.decode,
            kv_tier=args.kv_tier,
            kv_tier_maxmemory=args.kv_tier_maxmemory,
            engine=EngineConfig(
                dtype=args.dtype,
                device=args.device,
                block_size=args.block_size,
                num_kv_blocks=args.num_kv_blocks,
                max_model_len=args.max_model_len,
            ),
            gateway=args.gateway,
            gateway_port=args.gateway_port,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ServeError(f"invalid --{where.replace('_', '-')}: {first['msg']}") from None


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def cpu_threads_per_worker(workers: int) -> dict[str, str]:
    """Split the CPU between worker processes: every torch process defaults to all cores, and
    several of them on one machine spend more time contending than computing. A user's own
    OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // max(1, workers)))}


class LocalDeployment:
    """The children of one ``tusk serve`` run, started in dependency order."""

    def __init__(
        self,
        config: ServeConfig,
        model: ResolvedModel,
        served_name: str,
        routing: RoutingConfig,
        log_dir: Path,
    ):
        self.config = config
        self.model = model
        self.served_name = served_name
        self.routing = routing
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.kv_server = None
        self.url = ""
        self.gateway = None  # LocalGateway with --gateway envoy
        self.gateway_url = ""
        self.http_addresses: list[str] = []

    def _spawn(self, name: str, module: str, cfg_json: str, env: dict[str, str] | None = None) -> Child:
        child = Child(
            name,
            python_module_argv(module, "--config-json", cfg_json),
            self.log_dir / f"{name}.log",
            child_env(**(env or {})),
        )
        self.children.append(child)
        child.start()
        return child

    def start(self, timeout: float) -> str:
        if self.config.gateway:
            from tusk.router.epp.local import GatewayUnavailable, LocalGateway

            try:  # before anything starts: no Envoy, no deployment
                self.gateway = LocalGateway(self.config.host, self.config.gateway_port, self.log_dir)
            except GatewayUnavailable as exc:
                raise ServeError(str(exc)) from None
        kv_url = self._start_kv_tier()
        workers = self._start_workers(kv_url, timeout)
        self._start_router(workers, timeout)
        if self.gateway is not None:
            self._start_gateway(timeout)
        return self.url

    def _start_gateway(self, timeout: float) -> None:
        route = ModelRoute(
            name=self.served_name,
            tokenizer=str(self.model.path),
            block_size=self.config.engine.block_size,
            max_model_len=self.config.engine.max_model_len,
        )
        try:
            self.gateway_url = self.gateway.start(route, self.http_addresses, self.routing, timeout)
        except RuntimeError as exc:
            raise ServeError(f"gateway: {exc}") from None

    def _start_kv_tier(self) -> str:
        from tusk.kvserver import ping_url, start_server

        if self.config.kv_tier:
            try:
                ping_url(self.config.kv_tier)
            except ConnectionError as exc:
                raise ServeError(str(exc)) from None
            return self.config.kv_tier
        try:
            self.kv_server = start_server(maxmemory=self.config.kv_tier_maxmemory)
        except (FileNotFoundError, RuntimeError) as exc:
            raise ServeError(str(exc).splitlines()[0]) from None
        return self.kv_server.url

    def _start_workers(self, kv_url: str, timeout: float) -> list[WorkerEndpoint]:
        roles = [Role.PREFILL] * self.config.prefill
        roles += [Role.DECODE if self.config.prefill else Role.BOTH] * self.config.decode
        threads = cpu_threads_per_worker(len(roles))
        pending = []
        for i, role in enumerate(roles):
            worker_id = f"{role.value}-{i}"
            cfg = WorkerConfig(
                model=str(self.model.path),
                served_model_name=self.served_name,
                role=role,
                worker_id=worker_id,
                host=self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1",
                port=0,
                engine=self.config.engine,
                kv_tier=KVTierConfig(url=kv_url),
                http_port=0 if self.config.gateway else None,
            )
            pending.append((role, self._spawn(worker_id, "tusk.worker", cfg.model_dump_json(), threads)))
        endpoints = []
        for role, child in pending:  # workers load in parallel; collect them in order
            info = child.wait_ready(timeout)
            endpoints.append(WorkerEndpoint(address=info["address"], role=role))
            if info.get("http_address") and role != Role.PREFILL:
                self.http_addresses.append(info["http_address"])
        return endpoints

    def _start_router(self, workers: list[WorkerEndpoint], timeout: float) -> None:
        route = ModelRoute(
            name=self.served_name,
            tokenizer=str(self.model.path),
            block_size=self.config.engine.block_size,
            max_model_len=self.config.engine.max_model_len,
            workers=workers,
        )
        cfg = RouterConfig(
            host=self.config.host,
            port=self.config.port,
            models=[route],
            routing=self.routing,
        )
        child = self._spawn("router", "tusk.router", cfg.model_dump_json())
        info = child.wait_ready(timeout)
        address = info.get("address", f"{self.config.host}:{self.config.port}")
        host, _, port = address.rpartition(":")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        self.url = f"http://{host}:{port}"
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self.check_children()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise ServeError(f"router at {self.url} never became healthy ({last})")

    def check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise ChildFailed(
                    f"{child.name} exited (code {child.process.returncode}): {child.log_tail()}"
                )
        if self.kv_server is not None and not self.kv_server.alive():
            raise ChildFailed("the embedded KV tier server exited")
        if self.gateway is not None:
            for child in self.gateway.children():
                if not child.alive():
                    raise ChildFailed(f"{child.name} exited: {child.log_tail()}")
            if not self.gateway.envoy_alive():
                raise ChildFailed("envoy exited")

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        stop_all(self.children)
        if self.kv_server is not None:
            self.kv_server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    started = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        if not started.is_set():  # interrupt a start-up that is blocked waiting on a child
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deployment: LocalDeployment | None = None
    try:
        config = _config_from_args(args)
        _check_port_free(config.host, config.port)
        model = resolve_model(config.model)
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tusk-serve-"))
        routing = RoutingConfig(
            policy=args.policy, disaggregation_threshold_tokens=args.disaggregation_threshold
        )
        deployment = LocalDeployment(config, model, args.served_name or model.name, routing, log_dir)
        url = deployment.start(args.startup_timeout)
        started.set()
        mode = "aggregated" if config.prefill == 0 else f"{config.prefill} prefill + {config.decode} decode"
        print(
            json.dumps(
                {
                    "event": "ready",
                    "url": url,
                    "model": deployment.served_name,
                    "logs": str(log_dir),
                    **({"gateway_url": deployment.gateway_url} if deployment.gateway_url else {}),
                }
            ),
            flush=True,
        )
        print(f"tusk serve: {deployment.served_name} ({mode}) at {url}/v1 - Ctrl-C to stop", file=sys.stderr)
        if deployment.gateway_url:
            gateway = deployment.gateway_url
            print(f"tusk serve: Envoy gateway (tusk endpoint picker) at {gateway}/v1", file=sys.stderr)
        while not stop.wait(0.5):
            deployment.check_children()
        return 0
    except (ServeError, ModelSourceError, ChildFailed) as exc:
        print(f"tusk serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if deployment is not None:
            deployment.stop()


if __name__ == "__main__":
    sys.exit(main())
