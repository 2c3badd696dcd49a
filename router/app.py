"""The router process: Starlette app, lifecycle and ``main``.

``python -m tusk.router --config-json '<RouterConfig JSON>'`` (or ``--config FILE``) validates
the config, binds the port (0 = any free port), prints one JSON ready line on stdout and serves
until SIGTERM/SIGINT, then stops accepting connections, lets in-flight streams finish (up to
``--drain-timeout``) and exits 0. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tusk.router.api import RouterAPI
from tusk.router.discovery import KubernetesDiscovery, SelectorDiscovery, StaticDiscovery
from tusk.router.errors import APIError
from tusk.router.logs import setup_logging
from tusk.router.metrics import RouterMetrics
from tusk.router.registry import ModelRegistry
from tusk.router.tokenizer import TokenizerError

from tusk.config import RouterConfig

log = logging.getLogger("tusk.router")


@dataclass
class RouterOptions:
    """Process-level settings that are not part of the shared RouterConfig."""

    kubernetes: bool = False
    namespace: str | None = None
    poll_interval_s: float = 0.5


class Router:
    """The app plus what it owns; usable in-process (tests, benchmarks) or through ``main``."""

    def __init__(self, config: RouterConfig, options: RouterOptions | None = None) -> None:
        self.config = config
        self.options = options or RouterOptions()
        self.metrics = RouterMetrics()
        self.registry = ModelRegistry()
        self.api = RouterAPI(config, self.registry, self.metrics)
        self.discoveries: list[StaticDiscovery | KubernetesDiscovery | SelectorDiscovery] = [
            StaticDiscovery(config, self.registry, self.metrics, self.options.poll_interval_s)
        ]
        if self.options.kubernetes:
            namespace = self.options.namespace
            self.discoveries.append(
                KubernetesDiscovery(
                    self.registry,
                    self.metrics,
                    config.routing,
                    namespace=namespace,
                    poll_interval_s=self.options.poll_interval_s,
                )
            )
            for route in config.models:  # routes with their own selector: pods not labelled by tusk
                if route.kubernetes_selector:
                    self.discoveries.append(
                        SelectorDiscovery(
                            self.registry, route.name, selector=route.kubernetes_selector, namespace=namespace
                        )
                    )
        api = self.api
        routes = [
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/health/live", api.live, methods=["GET"]),
            Route("/metrics", api.metrics_endpoint, methods=["GET"]),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={404: _not_found, 405: _not_allowed, 500: _internal},
        )

    async def start(self) -> None:
        for discovery in self.discoveries:
            await discovery.start()

    async def stop(self) -> None:
        self.api.draining = True
        for discovery in self.discoveries:
            await discovery.stop()
        await self.registry.close()


async def _not_found(request: Request, exc: Exception) -> Response:
    return APIError(404, f"Unknown path {request.url.path}", code="unknown_url").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return APIError(
        405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
    ).response()


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "Internal server error.", type="server_error", code="internal_error").response()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tusk router", description="OpenAI-compatible router for tusk workers")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config-json", help="RouterConfig as a JSON string")
    src.add_argument("--config", type=Path, help="RouterConfig JSON (or YAML) file")
    p.add_argument("--host", help="override config host")
    p.add_argument("--port", type=int, help="override config port (0 = any free port)")
    p.add_argument(
        "--kubernetes",
        action="store_true",
        help="also serve the ModelDeployments in the cluster (their worker pods, checked by owner)",
    )
    p.add_argument("--namespace", help="watch only this namespace (default: all the router may list)")
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to let streams finish on SIGTERM"
    )
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> RouterConfig:
    if args.config_json:
        config = RouterConfig.model_validate_json(args.config_json)
    elif args.config:
        text = args.config.read_text()
        if args.config.suffix in (".yaml", ".yml"):
            import yaml

            config = RouterConfig.model_validate(yaml.safe_load(text))
        else:
            config = RouterConfig.model_validate_json(text)
    else:
        config = RouterConfig()
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return config.model_copy(update=updates) if updates else config


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by accepted connections: small SSE chunks and split header/body writes must not
    # wait for delayed ACKs (Nagle), which costs ~40 ms per response without uvloop.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def build_server(router: Router, drain_timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """The uvicorn server for ``router`` (no lifespan: ``Router.start``/``stop`` run around it)."""
    import uvicorn

    config = uvicorn.Config(
        router.app,
        log_level="warning",
        log_config=None,  # keep our JSON handler on the root logger for uvicorn too
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(drain_timeout),
        loop="none",
        http="httptools" if _has("httptools") else "h11",
        timeout_keep_alive=30,
    )

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Fail readiness and refuse new generations at once; in-flight streams go on.
            router.api.draining = True
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    return DrainingServer(config)


async def serve(router: Router, sock: socket.socket, drain_timeout: float, announce: bool = True) -> None:
    server = build_server(router, drain_timeout)

    async def announce_ready() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        models = list(router.registry.models)
        print(json.dumps({"event": "ready", "address": f"{host}:{port}", "models": models}), flush=True)

    await router.start()  # before serving, so a bad tokenizer fails the process, not a request
    # Everything loaded so far (modules, tokenizers, config) lives as long as the process; keep
    # it out of the cyclic GC's full passes, which otherwise show up as latency spikes.
    gc.collect()
    gc.freeze()
    task = asyncio.create_task(announce_ready()) if announce else None
    try:
        await server.serve(sockets=[sock])
    finally:
        if task is not None:
            task.cancel()
        await router.stop()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"tusk router: invalid config: {exc}", file=sys.stderr)
        return 2
    try:
        router = Router(config, RouterOptions(kubernetes=args.kubernetes, namespace=args.namespace))
        sock = _bind(config.host, config.port)
    except OSError as exc:
        print(f"tusk router: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    # uvicorn handles SIGTERM/SIGINT while serving (graceful drain) and re-raises them when it
    # returns; these no-op handlers turn that re-raise into a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    runner = _event_loop_runner()
    try:
        runner(serve(router, sock, args.drain_timeout))
    except (TokenizerError, OSError) as exc:
        print(f"tusk router: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _event_loop_runner():  # type: ignore[no-untyped-def]
    """uvloop when installed (several times faster HTTP handling), else asyncio."""
    if os.environ.get("TUSK_EVENT_LOOP") == "asyncio":
        return asyncio.run
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run
