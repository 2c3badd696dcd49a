"""OpenAI-compatible HTTP on a worker, as ``vllm serve`` exposes it, beside the gRPC server.

Gateways, load balancers, endpoint pickers and other routers speak OpenAI HTTP, not tusk's gRPC
protocol; this makes every worker reachable by them. The OpenAI layer is the router's own
(``tusk.router``: request schemas, chat template, tokenizer, incremental detokenization, stop
strings, error bodies), run in-process and pointed at this worker's gRPC server over loopback.
One implementation of the API means one behaviour: the HTTP path gives exactly the gRPC path's
tokens, because it *is* the gRPC path.

Besides /v1/chat/completions, /v1/completions and /v1/models it serves /health (200 while
serving, 503 while draining), /tokenize and /detokenize (vLLM's bodies), and /metrics: the
worker's own ``tusk_worker_*`` series plus the names endpoint pickers scrape under the Gateway
API Inference Extension's model-server protocol (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` and its older alias
``vllm:gpu_cache_usage_perc``, ``vllm:cache_config_info{block_size=...}``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tusk.router.errors import APIError, bad_request
from tusk.router.metrics import CONTENT_TYPE

from tusk.config import ModelRoute, RouterConfig, RoutingConfig, WorkerEndpoint

if TYPE_CHECKING:
    from tusk.router.app import Router
    from tusk.worker.server import WorkerService

log = logging.getLogger("tusk.worker.http")

_MAX_TOKENIZE_BODY = 4 << 20


class EngineCollector:
    """The model-server protocol's gauges, read from the engine's last step at scrape time."""

    def __init__(self, service: WorkerService) -> None:
        self.service = service

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        engine = self.service.engine
        stats = engine.last_stats
        name = self.service.model_name
        total = int(stats.get("total_blocks") or engine.num_blocks or 0)
        free = int(stats.get("free_blocks") or 0) if stats else total
        usage = (total - free) / total if total else 0.0

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", stats.get("waiting", 0))
        yield gauge("vllm:num_requests_running", "Requests holding KV blocks", stats.get("running", 0))
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent", usage)
        yield gauge("vllm:gpu_cache_usage_perc", "KV cache usage (older name); 1 means 100 percent", usage)
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache configuration",
            labels=["block_size", "num_gpu_blocks"],
        )
        info.add_metric([str(engine.block_size), str(engine.num_blocks)], 1.0)
        yield info


class WorkerHTTP:
    """The HTTP server of one worker; ``start`` after the gRPC server is listening."""

    def __init__(self, service: WorkerService, grpc_address: str) -> None:
        self.service = service
        self.grpc_address = grpc_address
        self.router: Router | None = None
        self.address = ""
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(EngineCollector(service))

    def _router_config(self) -> RouterConfig:
        engine = self.service.engine
        route = ModelRoute(
            name=self.service.model_name,
            tokenizer=str(engine.folder),
            block_size=engine.block_size,
            max_model_len=engine.max_model_len,
            workers=[WorkerEndpoint(address=self.grpc_address, role=self.service.config.role)],
        )
        # One worker: no routing to do, and no KV event feed to follow.
        routing = RoutingConfig(policy="round_robin", kv_events=False)
        return RouterConfig(models=[route], routing=routing, max_body_bytes=_MAX_TOKENIZE_BODY * 4)

    async def start(self, host: str, port: int) -> str:
        import uvicorn
        from tusk.router.app import Router, RouterOptions, _bind

        self.router = Router(self._router_config(), RouterOptions(poll_interval_s=0.25))
        await self.router.start()
        api = self.router.api
        routes = [
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers=self.router.app.exception_handlers)
        sock = _bind(host, port)
        config = uvicorn.Config(
            app,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            loop="none",
            http="httptools",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the worker owns its signals
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped the server
            await asyncio.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        if bound_host in ("0.0.0.0", "::", ""):
            bound_host = "127.0.0.1"
        self.address = f"{bound_host}:{bound_port}"
        return self.address

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the in-process OpenAI layer sees this worker healthy (first poll)."""
        assert self.router is not None
        runtime = self.router.registry.get(self.service.model_name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not runtime.has_ready_worker() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                log.debug("HTTP server did not stop cleanly", exc_info=True)
        if self.router is not None:
            await self.router.stop()

    # -- handlers ------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.service.draining:
            return Response(b'{"status":"draining"}', 503, media_type="application/json")
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        body = generate_latest(self._registry) + generate_latest(self.service.metrics.registry)
        body += generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE)

    def _tokenizer(self, body: dict[str, Any]):  # noqa: ANN202
        assert self.router is not None
        model = body.get("model") or self.service.model_name
        if not isinstance(model, str):
            raise bad_request("model must be a string", param="model")
        return self.router.registry.get(model).tokenizer

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: ``{"prompt": str}`` or ``{"messages": [...]}`` -> token ids."""
        try:
            body = await _json_object(request)
            tok = self._tokenizer(body)
            if "messages" in body:
                messages = body["messages"]
                if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("content", ""), str) for m in messages
                ):
                    raise bad_request("messages must be a list of {role, content} objects", param="messages")
                text = tok.render_chat(
                    [{"role": m.get("role", "user"), "content": m.get("content") or ""} for m in messages]
                )
                special = bool(body.get("add_special_tokens", False))
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
                special = bool(body.get("add_special_tokens", True))
            else:
                raise bad_request("give a string `prompt` or a list of `messages`", param="prompt")
            ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=special)
            limit = self.service.engine.max_model_len
            return _ok({"count": len(ids), "max_model_len": limit, "tokens": ids})
        except APIError as exc:
            return exc.response()

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: ``{"tokens": [int]}`` -> ``{"prompt": str}``."""
        try:
            body = await _json_object(request)
            tok = self._tokenizer(body)
            ids = body.get("tokens")
            vocab = tok.tokenizer.get_vocab_size(with_added_tokens=True)
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids
            ):
                raise bad_request(f"tokens must be a list of ids in [0, {vocab})", param="tokens")
            return _ok({"prompt": tok.decode(ids)})
        except APIError as exc:
            return exc.response()


def _ok(body: Any) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > _MAX_TOKENIZE_BODY:
        raise APIError(413, "Request body is too large.", code="request_too_large")
    try:
        body = json.loads(raw)
    except ValueError:
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body
