"""Where workers come from: the static config, or Kubernetes pods watched live.

Kubernetes discovery follows the label contract the operator writes on worker pods
(``app.kubernetes.io/name=tusk-worker``, ``tusk.dev/model``, ``tusk.dev/role``, the annotation
``tusk.dev/served-model-names`` and a container port named ``grpc``). Turning a pod into
endpoints is a pure function so it is testable without a cluster; the watch loop only feeds it.
A model first seen in the cluster gets its tokenizer from the worker's GetModelInfo RPC.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tusk.router.metrics import RouterMetrics
from tusk.router.registry import ModelRegistry, ModelRuntime
from tusk.router.tokenizer import ModelTokenizer
from tusk.router.workers import WorkerClient

from tusk.config import Role, RouterConfig, RoutingConfig

log = logging.getLogger("tusk.router.discovery")

WORKER_SELECTOR = "app.kubernetes.io/part-of=tusk,app.kubernetes.io/name=tusk-worker"
MODEL_LABEL = "tusk.dev/model"
ROLE_LABEL = "tusk.dev/role"
SERVED_NAMES = "tusk.dev/served-model-names"
ROUTING_ANNOTATION = "tusk.dev/routing"  # the ModelDeployment's spec.routing as RoutingConfig JSON
DEFAULT_GRPC_PORT = 50051
# How long a departing worker's in-flight streams may run on (workers drain for 30 s by default).
WORKER_DRAIN_S = 60.0


@dataclass(frozen=True)
class DiscoveredWorker:
    model: str  # served model name
    address: str
    role: Role
    routing: str = field(default="", compare=False)  # RoutingConfig JSON from the pod, if any


def _get(obj: Any, *path: str) -> Any:
    """Read a field from either a kubernetes-client object or a plain dict (watch events, tests)."""
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name, obj.get(_camel(name))) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _camel(name: str) -> str:
    if name == "pod_ip":  # the API spells initialisms in capitals
        return "podIP"
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def pod_endpoints(pod: Any, model: str | None = None) -> list[DiscoveredWorker]:
    """Endpoints a pod offers right now: none unless it is Running, Ready, not terminating,
    has an IP and carries the worker labels. With ``model`` (a config route's own
    ``kubernetes_selector`` found the pod) the pod serves that model whatever its labels say."""
    labels = _get(pod, "metadata", "labels") or {}
    if model is None and (
        labels.get("app.kubernetes.io/name") != "tusk-worker"
        or labels.get("app.kubernetes.io/part-of") != "tusk"
    ):
        return []
    if _get(pod, "metadata", "deletion_timestamp"):
        return []
    if _get(pod, "status", "phase") != "Running":
        return []
    conditions = _get(pod, "status", "conditions") or []
    if not any(_get(c, "type") == "Ready" and _get(c, "status") == "True" for c in conditions):
        return []
    ip = _get(pod, "status", "pod_ip")
    if not ip:
        return []
    try:
        role = Role(labels.get(ROLE_LABEL, "both"))
    except ValueError:
        log.warning("pod has an unknown role label", extra={"pod": _get(pod, "metadata", "name")})
        return []
    port = DEFAULT_GRPC_PORT
    for container in _get(pod, "spec", "containers") or []:
        for p in _get(container, "ports") or []:
            if _get(p, "name") == "grpc":
                port = int(_get(p, "container_port"))
    annotations = _get(pod, "metadata", "annotations") or {}
    names = [n.strip() for n in (annotations.get(SERVED_NAMES) or "").split(",") if n.strip()]
    if not names and labels.get(MODEL_LABEL):
        names = [labels[MODEL_LABEL]]
    if model is not None:
        names = [model]
    host = f"[{ip}]" if ":" in ip else ip
    routing = annotations.get(ROUTING_ANNOTATION) or ""
    return [DiscoveredWorker(model=n, address=f"{host}:{port}", role=role, routing=routing) for n in names]


def model_routing(worker: DiscoveredWorker, default: RoutingConfig) -> RoutingConfig:
    """The routing a ModelDeployment asked for (carried on its pods), else the router's default.
    A malformed annotation is logged and ignored rather than taking the model offline."""
    if not worker.routing:
        return default
    try:
        return RoutingConfig.model_validate_json(worker.routing)
    except ValueError as exc:
        log.warning("ignoring a bad routing annotation", extra={"model": worker.model, "error": str(exc)})
        return default


class StaticDiscovery:
    """Models and workers straight from RouterConfig (``tusk serve`` or a config file)."""

    def __init__(
        self,
        config: RouterConfig,
        registry: ModelRegistry,
        metrics: RouterMetrics,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s

    async def start(self) -> None:
        for route in self.config.models:
            tokenizer = ModelTokenizer.from_dir(route.tokenizer)
            runtime = ModelRuntime(
                route.name,
                tokenizer,
                block_size=route.block_size,
                routing=route.routing or self.config.routing,
                metrics=self.metrics,
                max_model_len=route.max_model_len,
                poll_interval_s=self.poll_interval_s,
            )
            self.registry.add(runtime)
            for endpoint in route.workers:
                runtime.add_endpoint(endpoint)

    async def stop(self) -> None:
        return None


class KubernetesDiscovery:
    """Watch worker pods and keep the registry in step with them.

    The ``kubernetes`` client is synchronous, so its watch runs in a thread and hands each event
    to the event loop; the loop owns the registry, so no locking is needed.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: RouterMetrics,
        routing: RoutingConfig,
        *,
        namespace: str | None = None,
        selector: str = WORKER_SELECTOR,
        api_factory: Callable[[], Any] | None = None,
        watch_timeout_s: int = 60,
        model: str | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.routing = routing
        self.namespace = namespace
        self.selector = selector
        self._api_factory = api_factory
        self.watch_timeout_s = watch_timeout_s
        self.model = model  # set: every pod the selector finds serves this configured model
        self._pods: dict[str, list[DiscoveredWorker]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._watch_forever, name="k8s-discovery", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:  # it notices within one watch timeout
            await asyncio.to_thread(self._thread.join, self.watch_timeout_s + 10)

    def _api(self) -> Any:
        if self._api_factory is not None:
            return self._api_factory()
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.CoreV1Api()

    def _watch_forever(self) -> None:
        from kubernetes import watch

        api = None
        while not self._stop.is_set():
            try:
                api = api or self._api()
                w = watch.Watch()
                kwargs: dict[str, Any] = {
                    "label_selector": self.selector,
                    "timeout_seconds": self.watch_timeout_s,
                    "_request_timeout": self.watch_timeout_s * 2,  # if the server ignores timeout_seconds
                }
                if self.namespace:
                    stream = w.stream(api.list_namespaced_pod, self.namespace, **kwargs)
                else:
                    stream = w.stream(api.list_pod_for_all_namespaces, **kwargs)
                for event in stream:
                    if self._stop.is_set():
                        w.stop()
                        break
                    self._post(event.get("type"), event.get("object"))
            except Exception as exc:  # the API server restarted, a 410, a network blip: re-list
                if self._stop.is_set():
                    break
                if "timed out" not in str(exc).lower():
                    log.warning("pod watch failed; retrying", extra={"error": str(exc)})
                    api = None
                    self._stop.wait(2.0)

    def _post(self, kind: str | None, pod: Any) -> None:
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_event, kind, pod)

    def on_event(self, kind: str | None, pod: Any) -> None:
        """Apply one watch event (ADDED / MODIFIED / DELETED) on the event loop."""
        name = f"{_get(pod, 'metadata', 'namespace')}/{_get(pod, 'metadata', 'name')}"
        before = set(self._pods.get(name, []))
        after = set() if kind == "DELETED" else set(pod_endpoints(pod, self.model))
        self._pods[name] = list(after)
        if not after:
            self._pods.pop(name, None)
        for gone in before - after:
            runtime = self.registry.models.get(gone.model)
            if runtime is not None:
                asyncio.get_running_loop().create_task(runtime.remove_worker(gone.address, WORKER_DRAIN_S))
        for new in after - before:
            self._add(new)
        for known in after & before:  # a model whose tokenizer fetch failed: try again
            if known.model not in self.registry.models:
                self._add(known)

    def _add(self, worker: DiscoveredWorker) -> None:
        runtime = self.registry.models.get(worker.model)
        if runtime is not None:
            runtime.add_worker(worker.address, worker.role)
            return
        if worker.model not in self._pending:  # first worker of a model: fetch its tokenizer
            self._pending[worker.model] = asyncio.get_running_loop().create_task(self._create_model(worker))

    async def _create_model(self, worker: DiscoveredWorker) -> None:
        probe = WorkerClient(worker.address, worker.role)
        try:
            info = await probe.model_info()
            tokenizer = ModelTokenizer(dict(info.files))
            runtime = ModelRuntime(
                worker.model,
                tokenizer,
                block_size=info.block_size or 16,
                routing=model_routing(worker, self.routing),
                metrics=self.metrics,
                max_model_len=info.max_model_len or None,
            )
            self.registry.add(runtime)
            for workers in self._pods.values():
                for w in workers:
                    if w.model == worker.model:
                        runtime.add_worker(w.address, w.role)
            log.info("model discovered", extra={"model": worker.model})
        except Exception as exc:
            log.warning("could not fetch model info", extra={"worker": worker.address, "error": str(exc)})
        finally:
            self._pending.pop(worker.model, None)
            await probe.close()
