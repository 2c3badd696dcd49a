"""Prometheus metrics of the router.

Each router app owns its own ``CollectorRegistry`` so several routers (tests, benchmarks) can live
in one process without colliding on metric names. Names follow Prometheus conventions
(``_seconds``, ``_total``) and carry the model, so one dashboard covers many models.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tusk.router.policies.base import RoutingDecision, WorkerState

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    def __init__(self) -> None:
        self._bound: dict[str, ModelMetrics] = {}
        self._decision_children: dict[tuple[str, str, str, str], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tusk_router_requests", "Finished HTTP API requests", ["model", "endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "tusk_router_ttft_seconds", "Time to first token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tusk_router_inter_token_latency_seconds",
            "Time between streamed token chunks",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tusk_router_e2e_latency_seconds", "Whole request", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "tusk_router_inflight_requests", "Requests admitted and not finished", registry=r
        )
        self.rejected = Counter(
            "tusk_router_rejected", "Requests refused by admission control", ["reason"], registry=r
        )
        self.admission_waiting = Gauge(
            "tusk_router_admission_waiting",
            "Requests waiting in the model's admission queue (tusk.router.admission)",
            ["model"],
            registry=r,
        )
        self.admission_held = Counter(
            "tusk_router_admission_held",
            "Requests that waited in the admission queue before being routed",
            ["model"],
            registry=r,
        )
        self.decisions = Counter(
            "tusk_router_routing_decisions",
            "Routing decisions",
            ["model", "policy", "reason", "disaggregated"],
            registry=r,
        )
        self.prompt_tokens = Counter("tusk_router_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.cached_tokens = Counter(
            "tusk_router_cached_tokens", "Prompt tokens whose KV was reused", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "tusk_router_completion_tokens", "Generated tokens", ["model"], registry=r
        )
        self.retries = Counter(
            "tusk_router_worker_retries",
            "Requests moved to another worker before the first token",
            ["model"],
            registry=r,
        )
        labels = ["model", "worker"]
        self.worker_healthy = Gauge(
            "tusk_router_worker_healthy", "1 if the worker is ready", labels, registry=r
        )
        self.worker_inflight = Gauge(
            "tusk_router_worker_inflight", "Requests the router has on it", labels, registry=r
        )
        self.worker_running = Gauge(
            "tusk_router_worker_running_requests", "Worker-reported running", labels, registry=r
        )
        self.worker_queued = Gauge(
            "tusk_router_worker_queued_requests", "Worker-reported queued", labels, registry=r
        )
        self.worker_free_blocks = Gauge(
            "tusk_router_worker_free_kv_blocks", "Worker-reported free KV blocks", labels, registry=r
        )

    def for_model(self, model: str) -> ModelMetrics:
        """Label children bound once per model: ``labels()`` costs ~2-10 µs per call, which
        adds up at thousands of requests per second."""
        bound = self._bound.get(model)
        if bound is None:
            bound = self._bound[model] = ModelMetrics(self, model)
        return bound

    def routing_decision(self, model: str, policy: str, decision: RoutingDecision) -> None:
        key = (
            model,
            policy,
            decision.reason or "unspecified",
            "true" if decision.prefill is not None else "false",
        )
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

    def update_workers(self, model: str, states: list[WorkerState]) -> None:
        for s in states:
            self.worker_healthy.labels(model, s.address).set(1 if s.healthy else 0)
            self.worker_inflight.labels(model, s.address).set(s.inflight)
            self.worker_running.labels(model, s.address).set(s.running_requests)
            self.worker_queued.labels(model, s.address).set(s.queued_requests)
            self.worker_free_blocks.labels(model, s.address).set(s.free_blocks)

    def forget_worker(self, model: str, address: str) -> None:
        for gauge in (
            self.worker_healthy,
            self.worker_inflight,
            self.worker_running,
            self.worker_queued,
            self.worker_free_blocks,
        ):
            try:
                gauge.remove(model, address)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """Per-model label children of ``RouterMetrics``."""

    def __init__(self, m: RouterMetrics, model: str) -> None:
        self.model = model
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.e2e = m.e2e.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.cached_tokens = m.cached_tokens.labels(model)
        self.completion_tokens = m.completion_tokens.labels(model)
        self.retries = m.retries.labels(model)
        self._requests = m.requests
        self._by_status: dict[tuple[str, str], Any] = {}

    def request(self, endpoint: str, status: int) -> None:
        key = (endpoint, str(status))
        child = self._by_status.get(key)
        if child is None:
            child = self._by_status[key] = self._requests.labels(self.model, *key)
        child.inc()
