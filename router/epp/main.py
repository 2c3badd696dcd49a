"""``tusk epp``: the endpoint picker process (Envoy ext_proc + gRPC health on one port).

Health services, per the endpoint-picker protocol: ``liveness`` (SERVING while the process
answers), ``readiness`` and ``envoy.service.ext_proc.v3.ExternalProcessor`` (SERVING once every
model's servers were scraped once, NOT_SERVING while draining). Prints the usual ready line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError
from tusk.router.epp.picker import EndpointPicker
from tusk.router.epp.protocol import EXT_PROC_SERVICE
from tusk.router.epp.service import ExternalProcessor
from tusk.router.logs import setup_logging
from tusk.router.tokenizer import TokenizerError

from tusk.config import EndpointPickerConfig, ModelRoute, RoutingConfig, WorkerEndpoint

log = logging.getLogger("tusk.router.epp")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EndpointPickerServer:
    """The picker and its gRPC server; usable in-process (tests, ``tusk serve``) or via ``main``."""

    def __init__(self, config: EndpointPickerConfig) -> None:
        self.config = config
        self.picker = EndpointPicker(config)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self._watch: asyncio.Task[None] | None = None
        self._ready = False
        self.metrics_port: int | None = None
        self._metrics_server = None
        self.pod_watches: list = []  # routes with a kubernetes_selector (router/epp/pods.py)

    async def start(self) -> str:
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        ext_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessor(self.picker, self.config.max_body_bytes), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        await self.health.set("liveness", SERVING)
        await self.health.set("", SERVING)
        for service in ("readiness", EXT_PROC_SERVICE):
            await self.health.set(service, NOT_SERVING)
        self.picker.start()
        if any(route.kubernetes_selector for route in self.config.models):
            from tusk.router.epp.pods import start_pod_watches

            self.pod_watches = await start_pod_watches(self.picker)
        await self.server.start()
        self._watch = asyncio.get_running_loop().create_task(self._readiness())
        if self.config.metrics_port is not None:  # picks, engine KV event feeds
            from prometheus_client import start_http_server

            server, _ = self._metrics_server = start_http_server(
                self.config.metrics_port, self.config.host, self.picker.metrics.registry
            )
            self.metrics_port = int(server.server_address[1])
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.address = f"{host}:{port}"
        return self.address

    async def _update_health(self) -> None:
        ready = self.picker.ready()
        if ready != self._ready:
            self._ready = ready
            for service in ("readiness", EXT_PROC_SERVICE):
                await self.health.set(service, SERVING if ready else NOT_SERVING)

    async def _readiness(self) -> None:
        while True:
            await self._update_health()
            await asyncio.sleep(0.1)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(m.pool.synced.wait() for m in self.picker.models.values())), timeout
        )
        await self._update_health()

    async def stop(self, grace: float = 5.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server[0].shutdown)
        for watch in self.pod_watches:
            await watch.stop()
        await self.health.enter_graceful_shutdown()  # readiness NOT_SERVING, liveness too
        if self.server is not None:
            await self.server.stop(grace)
        await self.picker.close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tusk epp",
        description="Gateway API Inference Extension endpoint picker (Envoy ext_proc) over OpenAI servers",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config-json", help="EndpointPickerConfig as a JSON string")
    src.add_argument("--config", type=Path, help="EndpointPickerConfig JSON file")
    p.add_argument("--model", help="served model name (with --tokenizer and --endpoint)")
    p.add_argument("--tokenizer", help="folder with the model's tokenizer.json / tokenizer_config.json")
    p.add_argument("--block-size", type=int, default=16, help="prefix-index block size in tokens")
    p.add_argument("--endpoint", action="append", default=[], help="a model server's HTTP ip:port (repeat)")
    p.add_argument("--policy", help="routing policy (default: cost)")
    p.add_argument("--fallbacks", type=int, help="fallback endpoints after the primary")
    p.add_argument("--shed-queue-depth", type=int, help="429 when every server has this many queued")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = any free port)")
    p.add_argument("--host", help="listen host")
    p.add_argument("--port", type=int, help="listen port (ext_proc + gRPC health; 0 = any)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> EndpointPickerConfig:
    if args.config_json:
        config = EndpointPickerConfig.model_validate_json(args.config_json)
    elif args.config:
        config = EndpointPickerConfig.model_validate_json(args.config.read_text())
    else:
        config = EndpointPickerConfig()
    if args.model:
        if not args.tokenizer or not args.endpoint:
            raise ValueError("--model needs --tokenizer and at least one --endpoint")
        workers = [WorkerEndpoint(address=a, protocol="http") for a in args.endpoint]
        route = ModelRoute(
            name=args.model, tokenizer=args.tokenizer, block_size=args.block_size, workers=workers
        )
        config = config.model_copy(update={"models": [*config.models, route]})
    updates: dict[str, object] = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("fallbacks", args.fallbacks),
            ("shed_queue_depth", args.shed_queue_depth),
            ("metrics_port", args.metrics_port),
        )
        if v is not None
    }
    if args.policy:
        updates["routing"] = RoutingConfig.model_validate(
            {**config.routing.model_dump(), "policy": args.policy}
        )
    config = EndpointPickerConfig.model_validate({**config.model_dump(), **updates})
    if not config.models:
        raise ValueError("no model to serve: give --config/--config-json or --model/--tokenizer/--endpoint")
    return config


async def serve(config: EndpointPickerConfig) -> int:
    server = EndpointPickerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    ready = {"event": "ready", "address": server.address, "models": list(server.picker.models)}
    print(json.dumps({**ready, "metrics_port": server.metrics_port}), flush=True)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"tusk epp: invalid config: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(config))
    except (TokenizerError, OSError) as exc:
        print(f"tusk epp: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
