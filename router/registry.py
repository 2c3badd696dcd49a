"""The models a router serves, each with its tokenizer, workers, prefix index and policies.

Discovery (static config or Kubernetes) only ever adds and removes workers here; the request
path only ever reads from here. Keeping that seam narrow is what lets workers come and go
without a router restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tusk.router.admission import AdmissionGate, AdmissionQueue
from tusk.router.errors import APIError, bad_request, model_not_found
from tusk.router.metrics import RouterMetrics
from tusk.router.policies.base import DEFAULT_PREFILL_TOKENS_PER_S, Policy, WorkerState
from tusk.router.prefix_index import PrefixIndex
from tusk.router.tokenizer import ModelTokenizer
from tusk.router.workers import WorkerClient

from tusk.config import Role, RoutingConfig, WorkerEndpoint
from tusk.protocol import pb

log = logging.getLogger("tusk.router.registry")

_KINDS = {
    pb.KvEvent.KIND_STORED: "stored",
    pb.KvEvent.KIND_REMOVED: "removed",
    pb.KvEvent.KIND_CLEARED: "cleared",
}
_MEDIA = {pb.KV_MEDIUM_DEVICE: "device", pb.KV_MEDIUM_HOST: "host", pb.KV_MEDIUM_TIER: "tier"}


def build_policy(name: str, index: PrefixIndex, routing: RoutingConfig) -> Policy:
    """One place that knows how RoutingConfig maps onto policy settings."""
    from tusk.router.policies import make_policy

    settings: dict[str, Any] = dict(routing.settings)
    if routing.disaggregation_threshold_tokens is not None:
        settings["disaggregation_threshold_tokens"] = routing.disaggregation_threshold_tokens
    return make_policy(name, index, **settings)


class ModelRuntime:
    """Everything the router keeps for one served model."""

    def __init__(
        self,
        name: str,
        tokenizer: ModelTokenizer,
        *,
        block_size: int,
        routing: RoutingConfig,
        metrics: RouterMetrics,
        max_model_len: int | None = None,
        poll_interval_s: float = 0.5,
        key: str | None = None,
        aliases: tuple[str, ...] = (),
        expect_model: frozenset[str] | None = None,
    ) -> None:
        self.name = name  # what responses and metrics call the model
        self.key = key or name  # unique in the registry (``namespace/ModelDeployment`` in a cluster)
        self.aliases = aliases  # further names clients may ask for
        self.expect_model = expect_model  # names a worker must report to be routed to (None: any)
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.routing = routing
        self.metrics = metrics
        self.max_model_len = max_model_len or tokenizer.max_model_len
        self.poll_interval_s = poll_interval_s
        self.index = PrefixIndex()
        self.clients: dict[str, WorkerClient] = {}
        self._policies: dict[str, Policy] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.http = None  # HttpRoutes when OpenAI HTTP servers (vLLM, SGLang) serve this model
        self.default_policy = self.policy(routing.policy)
        # requests wait here while every worker is busy (tusk.router.admission); per model
        self.admission = AdmissionGate(
            AdmissionQueue.from_config(
                routing.admission,
                default_prefill_tokens_per_s=float(
                    routing.settings.get("default_prefill_tokens_per_s", DEFAULT_PREFILL_TOKENS_PER_S)
                ),
            ),
            self.ready_states,
        )

    def policy(self, name: str | None) -> Policy:
        """The model's policy object by name, created once so its state (counters, learned
        thresholds) persists across requests."""
        name = name or self.routing.policy
        existing = self._policies.get(name)
        if existing is not None:
            return existing
        try:
            policy = build_policy(name, self.index, self.routing)
        except (KeyError, ValueError) as exc:
            raise bad_request(f"unknown routing policy {name!r}: {exc}", param="x-tusk-policy") from None
        self._policies[name] = policy
        return policy

    def set_routing(self, routing: RoutingConfig) -> None:
        """Switch to new routing settings live. Raises ValueError (and changes nothing) when they
        do not build a policy, so a bad setting keeps the last good one serving. Unchanged
        settings keep the policy objects, and with them what learning policies have learned."""
        if routing == self.routing:
            return
        try:
            policy = build_policy(routing.policy, self.index, routing)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"policy {routing.policy!r}: {exc}") from None
        self.routing = routing
        self._policies = {routing.policy: policy}
        self.default_policy = policy
        self.admission.queue.configure(routing.admission)
        self.admission.pump()
        log.info("routing changed", extra={"model": self.key, "policy": routing.policy})

    def ready_states(self) -> list[WorkerState]:
        return [c.state for c in self.clients.values() if c.state.healthy]

    def can_serve(self) -> bool:
        """A request can complete: some healthy worker decodes (prefill-only workers cannot)."""
        if self.http is not None and self.http.has_ready():
            return True
        return any(c.state.healthy and c.state.can_decode for c in self.clients.values())

    def has_ready_worker(self) -> bool:
        """Some worker of any role is healthy (a prefill worker's own HTTP layer waits for this)."""
        return any(c.state.healthy for c in self.clients.values())

    def client(self, address: str) -> WorkerClient:
        return self.clients[address]

    def add_worker(self, address: str, role: Role) -> WorkerClient:
        existing = self.clients.get(address)
        if existing is not None:
            existing.state.role = role
            return existing
        client = WorkerClient(
            address,
            role,
            poll_interval_s=self.poll_interval_s,
            kv_events=self.apply_kv_events if self.routing.kv_events else None,
            on_change=self._worker_changed,
            expect_model=self.expect_model,
            expect_block_size=self.block_size if self.expect_model is not None else None,
        )
        client.load.on_change = self.admission.pump
        self.clients[address] = client
        client.start()
        log.info("worker added", extra={"model": self.name, "worker": address, "role": str(role)})
        return client

    def add_endpoint(self, endpoint: WorkerEndpoint) -> None:
        """A configured endpoint: a tusk worker (gRPC) or an OpenAI HTTP server."""
        if endpoint.protocol != "http":
            self.add_worker(endpoint.address, endpoint.role)
            return
        from tusk.router.http_backend import HttpRoutes

        if self.http is None:
            self.http = HttpRoutes(self)
        self.http.add(endpoint)

    def detach_worker(self, address: str, grace_s: float) -> None:
        """Stop routing to a worker at once (synchronously, so discovery applies events in
        order); its in-flight calls get ``grace_s`` to finish in the background (a pod that
        starts terminating drains its streams; cutting them would fail clients)."""
        client = self.clients.pop(address, None)
        if client is None:
            return
        self._forget(client)
        task = asyncio.get_running_loop().create_task(client.close(grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def remove_worker(self, address: str, grace_s: float | None = None) -> None:
        """Stop routing to a worker and close its channel (after ``grace_s``, in the background)."""
        if grace_s:
            self.detach_worker(address, grace_s)
            return
        client = self.clients.pop(address, None)
        if client is not None:
            self._forget(client)
            await client.close()

    def _forget(self, client: WorkerClient) -> None:
        self.index.remove_worker(client.worker_id)
        self.metrics.forget_worker(self.name, client.address)
        log.info("worker removed", extra={"model": self.key, "worker": client.address})

    async def close(self) -> None:
        for address in list(self.clients):
            await self.remove_worker(address)
        for task in list(self._closing):
            task.cancel()
        if self.http is not None:
            await self.http.close()

    def _worker_changed(self, client: WorkerClient) -> None:
        if not client.state.healthy:
            # A restarted worker comes back with an empty cache; forget what it held.
            self.index.remove_worker(client.worker_id)
        self.metrics.update_workers(self.name, [client.state])

    def apply_kv_events(self, worker_id: str, batch: pb.KvEventBatch) -> None:
        for event in batch.events:
            kind = _KINDS.get(event.kind)
            medium = _MEDIA.get(event.medium)
            if kind is None or medium is None:
                continue
            self.index.apply_event(worker_id, kind, medium, event.block_hashes)

    def refresh_metrics(self) -> None:
        self.metrics.update_workers(self.name, [c.state for c in self.clients.values()])
        self.metrics.admission_waiting.labels(self.name).set(len(self.admission.queue))


class ModelRegistry:
    """Models by key. Clients may also ask by a model's served names (``aliases``); a served
    name that two models share (two namespaces serving "llama") is ambiguous and answered with
    an error naming the keys to use instead, so the two never merge."""

    def __init__(self) -> None:
        self.models: dict[str, ModelRuntime] = {}

    def get(self, name: str) -> ModelRuntime:
        runtime = self.models.get(name)
        if runtime is not None:
            return runtime
        matches = self.serving(name)
        if len(matches) == 1:
            return matches[0]
        if matches:
            keys = ", ".join(sorted(m.key for m in matches))
            raise APIError(
                400,
                f"The model {name!r} is served by several deployments ({keys}); ask for one of them.",
                param="model",
                code="model_ambiguous",
            )
        raise model_not_found(name)

    def serving(self, name: str) -> list[ModelRuntime]:
        """Models that answer to ``name`` besides their key."""
        return [rt for rt in self.models.values() if name in rt.aliases]

    def public_names(self) -> list[str]:
        """The names to list in /v1/models: each model's served names where unambiguous, else
        ``namespace/name`` (static models: their name). Any alias or key is accepted too."""
        names: list[str] = []
        for rt in self.models.values():
            served = [a for a in rt.aliases if "/" not in a]
            if not served:
                names.append(rt.key)
            for name in served:
                if len(self.serving(name)) == 1 and name not in self.models:
                    names.append(name)
                else:  # its namespace-qualified alias
                    names.extend(a for a in rt.aliases if a.endswith(f"/{name}"))
        return list(dict.fromkeys(names))

    def can_serve(self) -> bool:
        return any(rt.can_serve() for rt in self.models.values())

    def add(self, runtime: ModelRuntime) -> None:
        self.models[runtime.key] = runtime

    async def remove(self, key: str) -> None:
        runtime = self.models.pop(key, None)
        if runtime is not None:
            log.info("model removed", extra={"model": key})
            await runtime.close()

    async def close(self) -> None:
        for runtime in self.models.values():
            await runtime.close()
