"""A picker model's servers from the cluster: the pods its route's ``kubernetes_selector`` matches.

In a cluster the picker answers for InferencePools. The operator's pool selects one
ModelDeployment's decode workers (``tusk.operator.inference_pool.pool_selector``); a route with
that selector as its ``kubernetes_selector`` makes the picker's servers exactly the pool's pods:
Running, Ready, not terminating, with an IP (``discovery.pod_endpoint``), reached on the
container port named ``http`` (the pool's targetPort), with the engine's ZMQ KV events when the
pod names ``kv-events`` (and ``kv-replay``) ports, as vLLM workers of the operator do. Pods are watched in the picker's own
namespace (``POD_NAMESPACE``; an InferencePool names a picker in its own namespace) with
list+watch (``kube.Reflector``), and events are applied in order on the event loop. A pod that
goes away leaves the model's servers and the prefix index at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from tusk.operator.desired import HTTP_PORT
from tusk.operator.vllm import KV_EVENTS_PORT_NAME, KV_REPLAY_PORT_NAME
from tusk.router.discovery import PodSelectorWatch, object_key, pod_endpoint
from tusk.router.epp.picker import EndpointPicker, ModelPicker
from tusk.router.kube import SYNC, ListWatch

from tusk.config import Role, WorkerEndpoint

log = logging.getLogger("tusk.router.epp.pods")

HTTP_PORT_NAME = "http"


def pod_server(pod: dict[str, Any]) -> WorkerEndpoint | None:
    """A ready pod's OpenAI HTTP API (its ``http`` container port) and KV event sockets, or None.
    Prefill-only workers answer no requests, so they are never servers."""
    found = pod_endpoint(pod)
    if found is None or found[1] == Role.PREFILL:
        return None
    ports = {HTTP_PORT_NAME: HTTP_PORT}
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") and p.get("containerPort"):
                ports[p["name"]] = int(p["containerPort"])
    host = found[0].rpartition(":")[0]
    events, replay = ports.get(KV_EVENTS_PORT_NAME), ports.get(KV_REPLAY_PORT_NAME)
    return WorkerEndpoint(
        address=f"{host}:{ports[HTTP_PORT_NAME]}",
        protocol="http",
        kv_events=f"tcp://{host}:{events}" if events else None,
        kv_events_replay=f"tcp://{host}:{replay}" if events and replay else None,
    )


def pod_http_address(pod: dict[str, Any]) -> str | None:
    """``ip:port`` of a ready pod's OpenAI HTTP API, or None."""
    server = pod_server(pod)
    return server.address if server is not None else None


class PodServers(PodSelectorWatch):
    """Keeps one model's servers equal to the ready pods its selector matches."""

    def __init__(
        self,
        model: ModelPicker,
        selector: str,
        *,
        namespace: str | None = None,
        source: ListWatch | None = None,
        api_client_factory: Callable[[], Any] | None = None,
        watch_timeout_s: int = 300,
    ) -> None:
        super().__init__(
            selector,
            namespace=namespace,
            source=source,
            api_client_factory=api_client_factory,
            watch_timeout_s=watch_timeout_s,
        )
        self.model = model
        self.added: set[str] = set()  # servers this watch added (static ones are left alone)
        self._closing: set[asyncio.Task[None]] = set()

    def watch_name(self) -> str:
        return f"pods of {self.model.name}"

    async def stop(self) -> None:
        await super().stop()
        await asyncio.gather(*self._closing, return_exceptions=True)

    def on_pods(self, kind: str, payload: Any) -> None:
        if kind == SYNC:
            self.pods = {object_key(p): p for p in payload}
        elif kind == "DELETED":
            self.pods.pop(object_key(payload), None)
        else:
            self.pods[object_key(payload)] = payload
        wanted = {s.address: s for s in map(pod_server, self.pods.values()) if s is not None}
        for address in sorted(self.added - set(wanted)):
            self.model.pool.remove(address)
            self._close_feeds(address)
            self.added.discard(address)
            log.info("model %s: server %s left", self.model.name, address)
        for address in sorted(set(wanted) - self.added):
            self.model.routes.add(wanted[address])
            self.added.add(address)
            log.info("model %s: server %s joined", self.model.name, address)

    def _close_feeds(self, address: str) -> None:
        """Stop the KV event subscription of a server that left (a returning pod gets a new one)."""
        routes = self.model.routes
        for subscriber in [s for s in routes.subscribers if s.feed.worker_id == address]:
            routes.subscribers.remove(subscriber)
            task = asyncio.get_running_loop().create_task(subscriber.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


async def start_pod_watches(picker: EndpointPicker) -> list[PodServers]:
    """A ``PodServers`` for every route with a ``kubernetes_selector``, in ``POD_NAMESPACE``."""
    namespace = os.environ.get("POD_NAMESPACE") or None
    watches = []
    for route in picker.config.models:
        if route.kubernetes_selector:
            watch = PodServers(picker.models[route.name], route.kubernetes_selector, namespace=namespace)
            await watch.start()
            watches.append(watch)
    return watches
