"""OpenAI-compatible HTTP model servers (tusk workers' HTTP API, vLLM, SGLang) as routing targets.

What a policy needs of a worker (``WorkerState``) comes from the server's Prometheus /metrics,
read under the names of the Gateway API Inference Extension's model-server protocol, which vLLM
defines and tusk workers and SGLang also expose: queue length, running requests, KV usage and the
cache configuration. A failed scrape marks the server unhealthy at once (and forgets what the
prefix index believed it cached); the next good scrape brings it back.

Where a server publishes its KV events over ZMQ (vLLM's and SGLang's ``--kv-events-config``), a
``KvEventSubscriber`` (``kv_events_zmq``) keeps the prefix index exact; otherwise the caller
records each routing decision in the index (approximate mode, as with tusk's events off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tusk.router.policies.base import WorkerState
from tusk.router.prefix_index import PrefixIndex

from tusk.config import Role

log = logging.getLogger("tusk.router.http_backend")

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

    def apply(self, sample: LoadSample) -> None:
        s = self.state
        s.queued_requests = sample.waiting
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
            backend.apply(sample)
        if healthy != backend.state.healthy:
            backend.state.healthy = healthy
            if not healthy and not backend.exact_events:
                self.index.remove_worker(backend.address)
            log.info("model server health changed", extra={"worker": backend.address, "healthy": healthy})
            if self._on_change is not None:
                self._on_change(backend)
