"""A picker model's servers from the cluster: the pods its route's ``kubernetes_selector`` matches.

In a cluster the picker answers for InferencePools. The operator's pool selects one
ModelDeployment's decode workers (``tusk.operator.inference_pool.pool_selector``); a route with
that selector as its ``kubernetes_selector`` makes the picker's servers exactly the pool's pods:
Running, Ready, not terminating, with an IP (``discovery.pod_endpoint``), reached on the
container port named ``http`` (the pool's targetPort). Pods are watched in the picker's own
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
from tusk.router.discovery import _Watching, default_api_client, object_key, pod_endpoint
from tusk.router.epp.picker import EndpointPicker, ModelPicker
from tusk.router.kube import SYNC, ClientListWatch, ListWatch

from tusk.config import Role, WorkerEndpoint

log = logging.getLogger("tusk.router.epp.pods")

HTTP_PORT_NAME = "http"


def pod_http_address(pod: dict[str, Any]) -> str | None:
    """``ip:port`` of a ready pod's OpenAI HTTP API (its ``http`` container port), or None.
    Prefill-only workers answer no requests, so they are never servers."""
    found = pod_endpoint(pod)
    if found is None or found[1] == Role.PREFILL:
        return None
    port = HTTP_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == HTTP_PORT_NAME and p.get("containerPort"):
                port = int(p["containerPort"])
    return f"{found[0].rpartition(':')[0]}:{port}"


class PodServers(_Watching):
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
        super().__init__(watch_timeout_s)
        self.model = model
        self.selector = selector
        self.namespace = namespace
        self.source = source
        self._api_client_factory = api_client_factory or default_api_client
        self.pods: dict[str, dict[str, Any]] = {}
        self.added: set[str] = set()  # servers this watch added (static ones are left alone)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.source is None:
            from kubernetes import client

            core = client.CoreV1Api(await asyncio.to_thread(self._api_client_factory))
            if self.namespace:
                self.source = ClientListWatch(
                    core.list_namespaced_pod, self.namespace, label_selector=self.selector
                )
            else:
                self.source = ClientListWatch(core.list_pod_for_all_namespaces, label_selector=self.selector)
        self._watch(f"pods of {self.model.name}", self.source, lambda k, p: self._post(self.on_pods, k, p))

    async def stop(self) -> None:
        await self._stop_watches()

    def on_pods(self, kind: str, payload: Any) -> None:
        if kind == SYNC:
            self.pods = {object_key(p): p for p in payload}
        elif kind == "DELETED":
            self.pods.pop(object_key(payload), None)
        else:
            self.pods[object_key(payload)] = payload
        wanted = {a for a in map(pod_http_address, self.pods.values()) if a is not None}
        for address in sorted(self.added - wanted):
            self.model.pool.remove(address)
            self.added.discard(address)
            log.info("model %s: server %s left", self.model.name, address)
        for address in sorted(wanted - self.added):
            self.model.routes.add(WorkerEndpoint(address=address, protocol="http"))
            self.added.add(address)
            log.info("model %s: server %s joined", self.model.name, address)


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
