"""Choosing endpoints for a request body: the router's policies over OpenAI HTTP servers.

The picker reads the model and the prompt from the body, renders and tokenizes it exactly as the
router does (same chat template, same tokenizer, same block hashes) and asks the model's policy,
built by the same ``build_policy`` as the router's, over the servers' live load
(``HttpBackendPool``) and the model's prefix index. The primary endpoint is the policy's choice;
fallbacks are the other eligible servers, least loaded first.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from tusk.router.api import INLINE_ENCODE_CHARS, POLICY_HEADER, SESSION_HEADER
from tusk.router.errors import APIError
from tusk.router.http_backend import HttpBackendPool
from tusk.router.policies.base import NoWorkerAvailable, Policy, RoutingRequest, WorkerState
from tusk.router.prefix_index import PrefixIndex
from tusk.router.registry import build_policy
from tusk.router.tokenizer import ModelTokenizer

from tusk.config import EndpointPickerConfig, ModelRoute, RoutingConfig

log = logging.getLogger("tusk.router.epp")


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
    """One model: tokenizer, prefix index, policies and its servers."""

    def __init__(self, route: ModelRoute, routing: RoutingConfig, *, interval_s: float) -> None:
        self.name = route.name
        self.tokenizer = ModelTokenizer.from_dir(route.tokenizer)
        self.block_size = route.block_size
        self.routing = route.routing or routing
        self.index = PrefixIndex()
        self.pool = HttpBackendPool(self.index, interval_s=interval_s)
        for worker in route.workers:
            self.pool.add(worker.address, worker.role, exact_events=bool(worker.kv_events))
        self._policies: dict[str, Policy] = {}
        self.default_policy = self.policy(None)
        self.fallbacks_served = 0

    def policy(self, name: str | None) -> Policy:
        name = name or self.routing.policy
        policy = self._policies.get(name)
        if policy is None:
            try:
                policy = build_policy(name, self.index, self.routing)
            except (KeyError, ValueError) as exc:
                raise PickError(400, f"unknown routing policy {name!r}: {exc}", "unknown_policy") from None
            self._policies[name] = policy
        return policy

    def record(self, state: WorkerState, hashes: list[int]) -> None:
        """Approximate mode: the server that takes a prompt will cache its blocks."""
        backend = self.pool.backends.get(state.address)
        if hashes and backend is not None and not backend.exact_events:
            self.index.record_route(state.worker_id, hashes)

    async def prompt_ids(self, body: dict[str, Any]) -> list[int]:
        tok = self.tokenizer
        messages = body.get("messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise PickError(400, "messages must be a list of objects", "invalid_value")
            try:
                text = tok.render_chat(
                    [{"role": str(m.get("role", "user")), "content": _text(m)} for m in messages]
                )
            except APIError as exc:
                raise PickError(exc.status, exc.message, exc.code or "invalid_value") from None
            special = False
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
                prompt = prompt[0]
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return prompt
            if not isinstance(prompt, str):
                return []  # not a generation body (or one the server will refuse): route by load
            text, special = prompt, True
        if len(text) < INLINE_ENCODE_CHARS:
            return tok.encode(text, add_special_tokens=special)
        return await asyncio.to_thread(tok.encode, text, add_special_tokens=special)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


class EndpointPicker:
    """Every model the picker serves, and the decision procedure of the protocol."""

    def __init__(self, config: EndpointPickerConfig) -> None:
        self.config = config
        self.models = {
            route.name: ModelPicker(route, config.routing, interval_s=config.poll_interval_s)
            for route in config.models
        }
        self.shed = 0
        self.no_endpoint = 0

    def start(self) -> None:
        for model in self.models.values():
            model.pool.start()

    async def close(self) -> None:
        for model in self.models.values():
            await model.pool.close()

    def ready(self) -> bool:
        """Synced: every model's servers were scraped once (readiness, per the protocol)."""
        return bool(self.models) and all(m.pool.synced.is_set() for m in self.models.values())

    async def pick(self, headers: dict[str, str], raw: bytes, subset: list[str] | None) -> Pick:
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
        ids = await model.prompt_ids(body)
        return self._route(model, ids, headers, body, subset)

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
        headers: dict[str, str],
        body: dict[str, Any],
        subset: list[str] | None,
    ) -> Pick:
        from tusk.hashing import block_hashes

        states = self._eligible(model, subset)
        hashes = block_hashes(ids, model.block_size) if ids else []
        user = body.get("user")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        request = RoutingRequest(
            request_id=headers.get("x-request-id") or uuid.uuid4().hex,
            block_hashes=hashes,
            prompt_tokens=len(ids),
            block_size=model.block_size,
            session_key=headers.get(SESSION_HEADER) or (user if isinstance(user, str) else None),
            max_tokens=max_tokens if isinstance(max_tokens, int) else 0,
        )
        policy = model.policy(headers.get(POLICY_HEADER))
        try:
            decision = policy.route(request, states)
        except NoWorkerAvailable:
            self.no_endpoint += 1
            raise PickError(503, "No ready model server for this model.", "no_endpoint") from None
        # An OpenAI server prefills for itself: the picker routes whole requests (aggregated).
        primary = decision.decode
        primary.inflight += 1
        model.record(primary, hashes)
        return Pick(model, self._fallbacks(primary, states), hashes, charged=primary)
