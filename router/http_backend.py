"""OpenAI-compatible HTTP model servers (tusk workers' HTTP API, vLLM, SGLang) as routing targets.

What a policy needs of a worker (``WorkerState``) comes from the server's Prometheus /metrics,
read under the names of the Gateway API Inference Extension's model-server protocol, which vLLM
defines and tusk workers and SGLang also expose: queue length, running requests, KV usage and the
cache configuration. A failed scrape marks the server unhealthy at once (and forgets what the
prefix index believed it cached); the next good scrape brings it back.

These gauges only approximate the meanings that tusk's gRPC ``LoadReport`` defines (worker.proto,
what tusk workers, the emulator and the simulator report), field by field:

* ``queued_requests`` and ``running_requests``: the waiting and running gauges, the same meanings
  (vLLM counts a part-prefilled chunked prompt as running, a preempted one as waiting).
* ``queued_prefill_tokens``: estimated as waiting requests x the mean prompt routed lately. No
  gauge carries it, so it leaves out the running prefill's remainder (a server deep in a long
  chunked prefill reads as idle once its queue is empty) and gives no credit for prefixes the
  queued prompts will find cached.
* ``free_blocks`` / ``total_blocks``: KV usage x the cache config's block count; without a
  cache config, per mille of an unknown size (comparable between servers, not in blocks).
* ``prefill_tokens_per_s`` and ``decode_step_s``: not exported, left at 0 (unknown), so the
  ``cost`` policy uses its default prefill rate and counts no per-chunk decode or KV-wait time.

Where a server publishes its KV events over ZMQ (vLLM's and SGLang's ``--kv-events-config``), a
``KvEventSubscriber`` (``kv_events_zmq``) keeps the prefix index exact; otherwise the caller
records each routing decision in the index (approximate mode, as with tusk's events off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import httpx
import msgspec
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response
from tusk.router.api import INLINE_ENCODE_CHARS, POLICY_HEADER, SESSION_HEADER
from tusk.router.dispatch import MAX_ATTEMPTS
from tusk.router.errors import bad_request, no_worker, worker_failed
from tusk.router.policies.base import NoWorkerAvailable, RoutingRequest, WorkerState
from tusk.router.prefix_index import PrefixIndex
from tusk.router.token_cache import prompt_block_hashes, segment_encoder
from tusk.router.tokenizer import ModelTokenizer
from tusk.router.upstream import UpstreamError, UpstreamPool

from tusk.config import Role, WorkerEndpoint

if TYPE_CHECKING:
    from tusk.router.api import RouterAPI
    from tusk.router.registry import ModelRuntime

log = logging.getLogger("tusk.router.http_backend")
# httpx logs every request at INFO; the router logs its own (one line per request).
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

# Each load field and the metric names that carry it, first match wins (vLLM, then SGLang).
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
CACHE_INFO = "vllm:cache_config_info"


@dataclass
class LoadSample:
    """One scrape of a model server's load."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # 0..1
    block_size: int | None = None
    num_blocks: int | None = None


def parse_load(text: str) -> LoadSample:
    """Read the model-server protocol's gauges from Prometheus text (several models' series on
    one server are summed; a metric that is absent reads as zero)."""
    values: dict[str, float] = {}
    sample = LoadSample()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == CACHE_INFO:
                if s.labels.get("block_size", "").isdigit():
                    sample.block_size = int(s.labels["block_size"])
                if s.labels.get("num_gpu_blocks", "").isdigit():
                    sample.num_blocks = int(s.labels["num_gpu_blocks"])
            elif s.name in WAITING or s.name in RUNNING or s.name in KV_USAGE:
                values[s.name] = values.get(s.name, 0.0) + float(s.value)

    def first(names: tuple[str, ...]) -> float:
        return next((values[n] for n in names if n in values), 0.0)

    sample.waiting = int(first(WAITING))
    sample.running = int(first(RUNNING))
    sample.kv_usage = min(max(first(KV_USAGE), 0.0), 1.0)
    return sample


class HttpBackend:
    """One OpenAI-compatible server: its address (``host:port``) and the live view of it."""

    def __init__(self, address: str, role: Role = Role.BOTH, *, exact_events: bool = False) -> None:
        self.address = address
        self.base_url = f"http://{address}"
        self.state = WorkerState(worker_id=address, address=address, role=role, healthy=False)
        self.exact_events = exact_events  # the prefix index is fed by this server's KV events
        self.scraped = False

    def apply(self, sample: LoadSample, prompt_tokens: float) -> None:
        """``prompt_tokens``: the mean prompt routed lately; the metrics count queued requests,
        the ``cost`` policy weighs queued prefill tokens."""
        s = self.state
        s.queued_requests = sample.waiting
        s.queued_prefill_tokens = round(sample.waiting * prompt_tokens)
        s.running_requests = sample.running
        if sample.num_blocks:
            s.total_blocks = sample.num_blocks
            s.free_blocks = round(sample.num_blocks * (1.0 - sample.kv_usage))
        else:  # no cache config: usage in per mille of an unknown size is still comparable
            s.total_blocks = 1000
            s.free_blocks = round(1000 * (1.0 - sample.kv_usage))


class HttpBackendPool:
    """The servers of one model, scraped every ``interval_s``; the index forgets a server that
    stops answering (a restarted engine comes back with an empty cache)."""

    def __init__(
        self,
        index: PrefixIndex,
        *,
        interval_s: float = 0.5,
        timeout_s: float = 2.0,
        on_change: Callable[[HttpBackend], None] | None = None,
    ) -> None:
        self.index = index
        self.interval_s = interval_s
        self.backends: dict[str, HttpBackend] = {}
        self._client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_keepalive_connections=64))
        self._task: asyncio.Task[None] | None = None
        self._on_change = on_change
        self.synced = asyncio.Event()
        self.mean_prompt_tokens = 512.0  # EWMA of routed prompt lengths (see HttpBackend.apply)

    def observe_prompt(self, tokens: int) -> None:
        self.mean_prompt_tokens += 0.05 * (tokens - self.mean_prompt_tokens)

    def add(self, address: str, role: Role = Role.BOTH, *, exact_events: bool = False) -> HttpBackend:
        backend = self.backends.get(address)
        if backend is None:
            backend = self.backends[address] = HttpBackend(address, role, exact_events=exact_events)
        return backend

    def remove(self, address: str) -> None:
        if self.backends.pop(address, None) is not None:
            self.index.remove_worker(address)

    def states(self, only: Iterable[str] | None = None) -> list[WorkerState]:
        """Healthy servers' states, restricted to the addresses in ``only`` when given."""
        if only is None:
            return [b.state for b in self.backends.values() if b.state.healthy]
        wanted = set(only)
        return [b.state for a, b in self.backends.items() if a in wanted and b.state.healthy]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="http backend scrape")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self._scrape(b) for b in list(self.backends.values())))
        self.synced.set()

    async def _loop(self) -> None:
        while True:
            await self.scrape_all()
            await asyncio.sleep(self.interval_s)

    async def _scrape(self, backend: HttpBackend) -> None:
        try:
            reply = await self._client.get(f"{backend.base_url}/metrics")
            reply.raise_for_status()
            sample = parse_load(reply.text)
            healthy = True
        except (httpx.HTTPError, ValueError) as exc:
            if backend.state.healthy or not backend.scraped:
                log.warning(
                    "model server scrape failed", extra={"worker": backend.address, "error": str(exc)}
                )
            sample, healthy = None, False
        backend.scraped = True
        if sample is not None:
            backend.apply(sample, self.mean_prompt_tokens)
        if healthy != backend.state.healthy:
            backend.state.healthy = healthy
            if not healthy and not backend.exact_events:
                self.index.remove_worker(backend.address)
            log.info("model server health changed", extra={"worker": backend.address, "healthy": healthy})
            if self._on_change is not None:
                self._on_change(backend)


# -- the request path: the tusk router in front of OpenAI HTTP servers ------------------------------


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


async def prompt_token_ids(tokenizer: ModelTokenizer, body: dict[str, Any]) -> list[int]:
    """The prompt's token ids as the router would send them to a tusk worker (same chat template,
    same tokenizer), for routing only: the server re-tokenizes the body it receives. A body
    without a recognisable prompt gives [] (routed by load; the server judges the body)."""
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise bad_request("messages must be a list of objects", param="messages")
        text = tokenizer.render_chat(
            [{"role": str(m.get("role", "user")), "content": _message_text(m)} for m in messages]
        )
        special = False
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        if not isinstance(prompt, str):
            return []
        text, special = prompt, True
    if not special:  # a rendered chat: its history's pieces are cached across turns
        return await segment_encoder(tokenizer, tokenizer.tokenizer).encode_async(text, INLINE_ENCODE_CHARS)
    if len(text) < INLINE_ENCODE_CHARS:
        return tokenizer.encode(text, add_special_tokens=special)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=special)


class _EngineFeedCollector:
    """``tusk_router_engine_kv_events_total{model,worker,outcome}``: what every engine KV event
    feed of one router applied, skipped or repaired (outcomes are ``FeedStats`` fields and skip
    reasons), so malformed and lost events show on /metrics, not only in logs."""

    def __init__(self) -> None:
        self.routes: list[HttpRoutes] = []

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        family = CounterMetricFamily(
            "tusk_router_engine_kv_events",
            "Engine (vLLM/SGLang) KV event feed outcomes",
            labels=["model", "worker", "outcome"],
        )
        for routes in self.routes:
            for subscriber in routes.subscribers:
                stats = subscriber.feed.stats
                values = {k: v for k, v in vars(stats).items() if isinstance(v, int)}
                values.update({f"skipped_{k}": v for k, v in stats.skipped.items()})
                for outcome, value in values.items():
                    family.add_metric([routes.runtime.name, subscriber.feed.worker_id, outcome], value)
        yield family


_COLLECTORS: WeakKeyDictionary[Any, _EngineFeedCollector] = WeakKeyDictionary()


def _feed_collector(registry: Any) -> _EngineFeedCollector:
    """One collector per metrics registry, however many models it serves."""
    collector = _COLLECTORS.get(registry)
    if collector is None:
        collector = _COLLECTORS[registry] = _EngineFeedCollector()
        registry.register(collector)
    return collector


class HttpRoutes:
    """A model's OpenAI HTTP servers inside the tusk router: pool, KV event feeds, proxy."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.pool = HttpBackendPool(runtime.index, interval_s=runtime.poll_interval_s)
        self.subscribers: list[Any] = []
        self.upstreams: dict[str, UpstreamPool] = {}
        self._started = False

    def add(self, endpoint: WorkerEndpoint) -> HttpBackend:
        backend = self.pool.add(endpoint.address, endpoint.role, exact_events=bool(endpoint.kv_events))
        if endpoint.kv_events:
            from tusk.router.kv_events_zmq import EngineEventFeed, ZmqKvEventSubscriber

            feed = EngineEventFeed(self.runtime.index, endpoint.address, self.runtime.block_size)
            subscriber = ZmqKvEventSubscriber(feed, endpoint.kv_events, endpoint.kv_events_replay)
            self.subscribers.append(subscriber)
            if self._started:
                subscriber.start()
            collector = _feed_collector(self.runtime.metrics.registry)
            if self not in collector.routes:
                collector.routes.append(self)
        if not self._started:
            self._started = True
            self.pool.start()
            for subscriber in self.subscribers:
                subscriber.start()
        return backend

    def has_ready(self) -> bool:
        return any(b.state.healthy for b in self.pool.backends.values())

    async def close(self) -> None:
        collector = _COLLECTORS.get(self.runtime.metrics.registry)
        if collector is not None and self in collector.routes:
            collector.routes.remove(self)
        for subscriber in self.subscribers:
            await subscriber.close()
        await self.pool.close()
        for upstream in self.upstreams.values():
            upstream.close()

    def route(
        self,
        ids: list[int],
        hashes: list[int],
        headers: Any,
        body: dict[str, Any],
        excluded: set[str] | None = None,
        states: list[WorkerState] | None = None,
    ) -> HttpBackend:
        """The policy's choice among ``states`` (default: every healthy server not excluded)."""
        runtime = self.runtime
        if states is None:
            states = [s for s in self.pool.states() if not excluded or s.address not in excluded]
        if not states:
            raise no_worker(runtime.name)
        user = body.get("user")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        request = RoutingRequest(
            request_id=headers.get("x-request-id") or "",
            block_hashes=hashes,
            prompt_tokens=len(ids),
            block_size=runtime.block_size,
            session_key=headers.get(SESSION_HEADER) or (user if isinstance(user, str) else None),
            max_tokens=max_tokens if isinstance(max_tokens, int) else 0,
        )
        allow = runtime.routing.allow_policy_header  # off unless configured
        policy = runtime.policy(headers.get(POLICY_HEADER) if allow else None)
        try:
            decision = policy.route(request, states)
        except NoWorkerAvailable:
            raise no_worker(runtime.name) from None
        chosen = decision.decode  # an OpenAI server prefills for itself
        if ids:
            self.pool.observe_prompt(len(ids))
        backend = self.pool.backends[chosen.address]
        if hashes and not backend.exact_events:
            runtime.index.record_route(chosen.worker_id, hashes)
        return backend

    async def proxy(
        self, request: Request, raw: bytes, body: dict[str, Any], path: str, release: Any
    ) -> Response:
        """Route and forward one generation; the upstream's status, headers and bytes (SSE
        included) pass through untouched. Connection failures before the upstream answered move
        the request to another server; ``release`` runs once the response is over."""
        started = time.perf_counter()
        ids = await prompt_token_ids(self.runtime.tokenizer, body)
        hashes = await prompt_block_hashes(ids, self.runtime.block_size) if ids else []
        excluded: set[str] = set()
        headers: list[tuple[bytes, bytes]] = []
        auth = request.headers.get("authorization")
        if auth:
            headers.append((b"authorization", auth.encode()))
        while True:
            backend = self.route(ids, hashes, request.headers, body, excluded)
            state = backend.state
            state.inflight += 1
            pool = self.upstreams.get(backend.address)
            if pool is None:
                pool = self.upstreams[backend.address] = UpstreamPool(backend.address)
            try:
                upstream = await pool.post(path, raw, headers)
            except UpstreamError as exc:
                state.inflight -= 1
                excluded.add(backend.address)
                log.warning(
                    "model server failed; trying another",
                    extra={"worker": backend.address, "error": str(exc)},
                )
                if len(excluded) >= MAX_ATTEMPTS:
                    raise worker_failed(f"{MAX_ATTEMPTS} model servers failed; last error {exc}") from None
                continue
            break
        passed = [(k, v) for k, v in upstream.headers.items() if k in _PASSED_HEADERS]

        async def done() -> None:
            state.inflight -= 1
            upstream.close()
            release()
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request done",
                    extra={
                        "model": self.runtime.name,
                        "status": upstream.status,
                        "prompt_tokens": len(ids),
                        "e2e_s": round(time.perf_counter() - started, 6),
                        "decode_worker": backend.address,
                    },
                )

        if not body.get("stream"):
            try:
                content = await upstream.read()
            except UpstreamError as exc:
                raise worker_failed(str(exc)) from None
            finally:
                await done()
            response = Response(content, upstream.status)
            response.raw_headers[1:1] = passed  # after content-length, as the upstream sent them
            return response
        return _PassThrough(upstream, passed, done)


_PASSED_HEADERS = {b"content-type", b"x-request-id", b"cache-control"}


class _PassThrough:
    """Upstream bytes to the client as they come; ``on_close`` runs however the stream ends.

    A plain ASGI response rather than Starlette's ``StreamingResponse``, which opens an anyio
    task group with a disconnect-listener task for every stream under uvicorn's ASGI 2.3 (most
    of a streamed request's overhead here). One asyncio task watches for the client leaving and
    then closes the upstream connection, which ends the copy loop at once, mid-wait included."""

    def __init__(self, upstream: Any, headers: list[tuple[bytes, bytes]], on_close: Any) -> None:
        self.upstream = upstream
        self.status_code = upstream.status
        self.raw_headers = headers
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        upstream = self.upstream
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            upstream.close()  # wakes the copy loop's read

        watcher = asyncio.ensure_future(watch())
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            try:
                async for chunk in upstream.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (UpstreamError, OSError):
                if not gone:
                    raise
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self._on_close()


class _ModelOnly(msgspec.Struct):
    model: Any = None


async def maybe_proxy(api: RouterAPI, request: Request, raw: bytes, kind: str) -> Response | None:
    """The router's hook: a generation for a model served by OpenAI HTTP servers is proxied;
    None for anything else (tusk workers, or a body the normal path must reject)."""
    try:
        name = msgspec.json.decode(raw, type=_ModelOnly).model
    except msgspec.DecodeError:
        return None
    runtime = api.registry.models.get(name) if isinstance(name, str) else None
    routes = getattr(runtime, "http", None)
    if routes is None:
        return None
    body = msgspec.json.decode(raw)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"

    def release() -> None:
        api.inflight -= 1

    try:
        return await routes.proxy(request, raw, body, path, release)
    except BaseException:
        release()
        raise
