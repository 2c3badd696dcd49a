"""Choosing endpoints for a request body: the router's policies over OpenAI HTTP servers.

Each model is a ``ModelRuntime`` whose servers are OpenAI HTTP endpoints (``HttpRoutes``), the
very objects ``tusk router`` uses in front of vLLM or SGLang: the prompt is rendered and
tokenized as the router does (same chat template, tokenizer and block hashes), the model's
policy (built by the same ``build_policy``) chooses over the servers' live load and the prefix
index (approximate, or exact from the servers' ZMQ KV events). The primary endpoint is the
policy's choice; fallbacks are the other eligible servers, least loaded first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import Counter
from tusk.router.errors import APIError
from tusk.router.http_backend import HttpRoutes, prompt_token_ids
from tusk.router.metrics import RouterMetrics
from tusk.router.policies.base import WorkerState
from tusk.router.registry import ModelRuntime
from tusk.router.token_cache import prompt_block_hashes
from tusk.router.tokenizer import ModelTokenizer

from tusk.config import EndpointPickerConfig, ModelRoute, RoutingConfig


class PickError(Exception):
    """The request gets an immediate response instead of an endpoint."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _load(w: WorkerState) -> tuple[int, str]:
    return (w.inflight + w.running_requests + w.queued_requests, w.address)


@dataclass
class Pick:
    """One routed request; ``release`` once its response is over."""

    model: ModelPicker | None
    endpoints: list[str]
    block_hashes: list[int] = field(default_factory=list)
    charged: WorkerState | None = None
    started: float = field(default_factory=time.perf_counter)

    def served(self, address: str | None) -> None:
        """The data plane reports which endpoint served (a fallback, after a retry)."""
        if self.model is None or not address or self.charged is None or address == self.charged.address:
            return
        backend = self.model.pool.backends.get(address)
        if backend is None:
            return
        self.charged.inflight -= 1
        self.charged = backend.state
        self.charged.inflight += 1
        self.model.record(backend.state, self.block_hashes)
        self.model.fallbacks_served += 1

    def release(self) -> None:
        if self.charged is not None:
            self.charged.inflight -= 1
            self.charged = None


class ModelPicker:
    """One model: a ``ModelRuntime`` whose servers are OpenAI HTTP endpoints."""

    def __init__(
        self, route: ModelRoute, routing: RoutingConfig, metrics: RouterMetrics, *, interval_s: float
    ):
        self.name = route.name
        self.runtime = ModelRuntime(
            route.name,
            ModelTokenizer.from_dir(route.tokenizer),
            block_size=route.block_size,
            routing=route.routing or routing,
            metrics=metrics,
            max_model_len=route.max_model_len,
            poll_interval_s=interval_s,
        )
        self.routes = HttpRoutes(self.runtime)
        self.runtime.http = self.routes
        self.pool = self.routes.pool
        self.index = self.runtime.index
        self._workers = [w.model_copy(update={"protocol": "http"}) for w in route.workers]
        self.fallbacks_served = 0

    def start(self) -> None:
        for worker in self._workers:
            self.routes.add(worker)

    def record(self, state: WorkerState, hashes: list[int]) -> None:
        """Approximate mode: the server that takes a prompt will cache its blocks."""
        backend = self.pool.backends.get(state.address)
        if hashes and backend is not None and not backend.exact_events:
            self.index.record_route(state.worker_id, hashes)


class EndpointPicker:
    """Every model the picker serves, and the decision procedure of the protocol."""

    def __init__(self, config: EndpointPickerConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.models = {
            route.name: ModelPicker(route, config.routing, self.metrics, interval_s=config.poll_interval_s)
            for route in config.models
        }
        self.shed = 0
        self.no_endpoint = 0
        self.picks = Counter(
            "tusk_epp_picks", "Endpoint picks by outcome (HTTP status answered)", ["status"],
            registry=self.metrics.registry,
        )  # fmt: skip

    def start(self) -> None:
        for model in self.models.values():
            model.start()

    async def close(self) -> None:
        for model in self.models.values():
            await model.runtime.close()

    def ready(self) -> bool:
        """Synced: every model's servers were scraped once (readiness, per the protocol)."""
        return bool(self.models) and all(m.pool.synced.is_set() for m in self.models.values())

    async def pick(self, headers: dict[str, str], raw: bytes, subset: list[str] | None) -> Pick:
        try:
            pick = await self._pick(headers, raw, subset)
        except PickError as exc:
            self.picks.labels(str(exc.status)).inc()
            raise
        self.picks.labels("200").inc()
        return pick

    async def _pick(self, headers: dict[str, str], raw: bytes, subset: list[str] | None) -> Pick:
        body: dict[str, Any] = {}
        if raw:
            try:
                body = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                raise PickError(400, "The request body is not valid JSON.", "invalid_json") from None
            if not isinstance(body, dict):
                raise PickError(400, "The request body must be a JSON object.", "invalid_json")
        name = body.get("model")
        if name is None:
            if len(self.models) != 1:
                return self._by_load(None, subset)  # GET /v1/models and the like: any server
            model = next(iter(self.models.values()))
            if not raw:
                return self._by_load(model, subset)
            raise PickError(400, "Missing required parameter: 'model'.", "missing_required_parameter")
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            raise PickError(404, f"The model `{name}` does not exist.", "model_not_found")
        try:
            ids = await prompt_token_ids(model.runtime.tokenizer, body)
        except APIError as exc:
            raise PickError(exc.status, exc.message, exc.code or "invalid_value") from None
        hashes = await prompt_block_hashes(ids, model.runtime.block_size) if ids else []
        return self._route(model, ids, hashes, headers, body, subset)

    def _eligible(self, model: ModelPicker | None, subset: list[str] | None) -> list[WorkerState]:
        pools = [model.pool] if model is not None else [m.pool for m in self.models.values()]
        states = [s for pool in pools for s in pool.states(subset)]
        if not states:
            self.no_endpoint += 1
            what = "in the subset the gateway allowed" if subset is not None else "for this model"
            raise PickError(503, f"No ready model server {what}.", "no_endpoint")
        depth = self.config.shed_queue_depth
        if depth is not None and all(s.queued_requests + s.inflight >= depth for s in states):
            self.shed += 1
            raise PickError(429, "Every model server is saturated; retry later.", "overloaded")
        return states

    def _fallbacks(self, primary: WorkerState, states: list[WorkerState]) -> list[str]:
        others = sorted((s for s in states if s.address != primary.address), key=_load)
        return [primary.address] + [s.address for s in others[: self.config.fallbacks]]

    def _by_load(self, model: ModelPicker | None, subset: list[str] | None) -> Pick:
        states = self._eligible(model, subset)
        primary = min(states, key=_load)
        primary.inflight += 1
        return Pick(model, self._fallbacks(primary, states), charged=primary)

    def _route(
        self,
        model: ModelPicker,
        ids: list[int],
        hashes: list[int],
        headers: dict[str, str],
        body: dict[str, Any],
        subset: list[str] | None,
    ) -> Pick:
        states = self._eligible(model, subset)
        try:
            backend = model.routes.route(ids, hashes, headers, body, states=states)
        except APIError as exc:  # the policy found nothing it may use
            raise PickError(exc.status, exc.message, exc.code or "no_endpoint") from None
        primary = backend.state
        primary.inflight += 1
        return Pick(model, self._fallbacks(primary, states), hashes, charged=primary)
