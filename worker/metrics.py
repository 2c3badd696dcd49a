"""Prometheus metrics of one worker, on their own registry so several in-process workers coexist."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(self, worker_id: str, role: str, model: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"worker_id": worker_id, "role": role, "model": model}
        names, values = list(labels), list(labels.values())

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry).labels(*values)

        self._requests = counter("tusk_worker_requests", "Finished requests by finish reason", ("reason",))
        self._request_labels = values
        self.rejected = counter(
            "tusk_worker_rejected_requests", "Requests refused as invalid or while draining"
        ).labels(*values)
        self.prompt_tokens = counter("tusk_worker_prompt_tokens", "Prompt tokens computed").labels(*values)
        self.generated_tokens = counter("tusk_worker_generated_tokens", "Tokens sampled").labels(*values)
        self.cache_hit_tokens = counter(
            "tusk_worker_cache_hit_tokens", "Prompt tokens whose KV was reused (device cache or tier)"
        ).labels(*values)
        self.cache_query_tokens = counter(
            "tusk_worker_cache_query_tokens", "Prompt tokens looked up in the caches"
        ).labels(*values)
        self.preemptions = counter("tusk_worker_preemptions", "Sequences preempted for KV memory").labels(
            *values
        )
        self.step_seconds = Histogram(
            "tusk_worker_step_seconds",
            "Engine step time",
            names,
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        ).labels(*values)
        self.batch_size = Histogram(
            "tusk_worker_batch_size",
            "Sequences per step",
            names,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        ).labels(*values)
        self.ttft_seconds = Histogram(
            "tusk_worker_time_to_first_token_seconds",
            "From arrival at the engine to the first token sampled here (queue + KV load + prefill)",
            names,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(*values)
        self.free_blocks = gauge("tusk_worker_kv_free_blocks", "KV blocks free or evictable")
        self.total_blocks = gauge("tusk_worker_kv_total_blocks", "KV blocks in the cache")
        self.running = gauge("tusk_worker_running_requests", "Requests holding KV blocks")
        self.waiting = gauge("tusk_worker_waiting_requests", "Requests queued or loading KV")

    def finished(self, reason: str) -> None:
        self._requests.labels(*self._request_labels, reason).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server; returns its port (``port`` 0 picks a free one).

        It also exposes the process-wide default registry, where the KV tier client and the
        kernels keep their metrics.
        """
        union = CollectorRegistry(auto_describe=False)
        union.register(_Union(self.registry, REGISTRY))
        server, _thread = start_http_server(port, addr=host, registry=union)
        return int(server.server_address[1])


class _Union:
    """A collector yielding every metric of several registries."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        for registry in self.registries:
            yield from registry.collect()
