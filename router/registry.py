"""The models a router serves, each with its tokenizer, workers, prefix index and policies.

Discovery (static config or Kubernetes) only ever adds and removes workers here; the request
path only ever reads from here. Keeping that seam narrow is what lets workers come and go
without a router restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tusk.router.errors import bad_request, model_not_found
from tusk.router.metrics import RouterMetrics
from tusk.router.policies.base import Policy, WorkerState
from tusk.router.prefix_index import PrefixIndex
from tusk.router.tokenizer import ModelTokenizer
from tusk.router.workers import WorkerClient

from tusk.config import Role, RoutingConfig
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

    settings: dict[str, Any] = {}
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
    ) -> None:
        self.name = name
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
        self.default_policy = self.policy(routing.policy)

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

    def ready_states(self) -> list[WorkerState]:
        return [c.state for c in self.clients.values() if c.state.healthy]

    def has_ready_worker(self) -> bool:
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
        )
        self.clients[address] = client
        client.start()
        log.info("worker added", extra={"model": self.name, "worker": address, "role": str(role)})
        return client

    async def remove_worker(self, address: str, grace_s: float | None = None) -> None:
        """Stop routing to a worker at once; its in-flight calls get ``grace_s`` to finish
        (a pod that starts terminating drains its streams; cutting them would fail clients)."""
        client = self.clients.pop(address, None)
        if client is None:
            return
        self.index.remove_worker(client.worker_id)
        self.metrics.forget_worker(self.name, address)
        log.info("worker removed", extra={"model": self.name, "worker": address})
        if grace_s:
            task = asyncio.get_running_loop().create_task(client.close(grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            await client.close()

    async def close(self) -> None:
        for address in list(self.clients):
            await self.remove_worker(address)
        for task in list(self._closing):
            task.cancel()

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


class ModelRegistry:
    def __init__(self) -> None:
        self.models: dict[str, ModelRuntime] = {}

    def get(self, name: str) -> ModelRuntime:
        runtime = self.models.get(name)
        if runtime is None:
            raise model_not_found(name)
        return runtime

    def add(self, runtime: ModelRuntime) -> None:
        self.models[runtime.name] = runtime

    async def close(self) -> None:
        for runtime in self.models.values():
            await runtime.close()
