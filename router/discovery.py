"""Where workers come from: the static config, or ModelDeployments and their pods in a cluster.

In a cluster the router serves what the operator deployed, and nothing else:

- It follows two collections with list+watch (``kube.Reflector``): ModelDeployments and worker
  pods (``app.kubernetes.io/name=tusk-worker``). Events are applied on the event loop in the
  order the API server sent them, and removals happen at once, so a label change or a
  NotReady→Ready flap can never delete a worker that was just added back.
- Trust comes from ownership, not labels: a pod is a routing target only when its controller
  chain, checked by uid, is ReplicaSet → Deployment → a ModelDeployment the router watches in
  the pod's namespace. A pod with the worker labels but no such chain (a tenant's pod, a forged
  annotation) is ignored and logged once. The chain lookups (two GETs) are cached by uid and
  run in the watch thread, before the event reaches the loop.
- A model is keyed ``namespace/ModelDeployment``; same-named models in two namespaces never
  merge. Clients may ask by served name when only one namespace serves it (see registry.py).
- The worker must say it is what the ModelDeployment describes: its Health/GetModelInfo model
  name must be one of the served names and its block size the spec's, or it gets no traffic.
- ``spec.routing`` is applied live; a setting that does not validate is logged with its field
  and the last good routing stays in force.

A config route with its own ``kubernetes_selector`` claims pods by that selector instead (an
admin's explicit choice, e.g. workers not deployed by the operator); see ``SelectorDiscovery``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from tusk.operator import schema as crd
from tusk.operator.spec import RoutingSettings, RoutingSpec
from tusk.router.kube import SYNC, ClientListWatch, ListWatch, Reflector, pod_list_watch
from tusk.router.metrics import RouterMetrics
from tusk.router.prefix_index import PrefixIndex
from tusk.router.registry import ModelRegistry, ModelRuntime, build_policy
from tusk.router.tokenizer import ModelTokenizer
from tusk.router.workers import WorkerClient

from tusk.config import Role, RouterConfig, RoutingConfig

log = logging.getLogger("tusk.router.discovery")

WORKER_SELECTOR = "app.kubernetes.io/part-of=tusk,app.kubernetes.io/name=tusk-worker"
ROLE_LABEL = "tusk.dev/role"
DEFAULT_GRPC_PORT = 50051
# How long a departing worker's in-flight streams may run on (workers drain for 30 s by default).
WORKER_DRAIN_S = 60.0
_OWNER_CACHE_MAX = 4096
RETRY_MODEL_S = 5.0  # a model whose workers could not be asked for its tokenizer yet

# GET one namespaced object ("ReplicaSet" or "Deployment"), None when it does not exist.
GetObject = Callable[[str, str, str], dict[str, Any] | None]


# -- pods -----------------------------------------------------------------------------------------


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def object_key(obj: dict[str, Any]) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace')}/{meta.get('name')}"


def pod_endpoint(pod: dict[str, Any]) -> tuple[str, Role] | None:
    """The (address, role) a pod offers right now: none unless it is Running, Ready, not
    terminating and has an IP and a known role. The port is the container port named ``grpc``."""
    meta, status = _meta(pod), pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    conditions = status.get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return None
    ip = status.get("podIP")
    if not ip:
        return None
    try:
        role = Role((meta.get("labels") or {}).get(ROLE_LABEL, "both"))
    except ValueError:
        return None
    port = DEFAULT_GRPC_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "grpc" and p.get("containerPort"):
                port = int(p["containerPort"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}", role


def controller_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    for ref in _meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def _group(api_version: str | None) -> str:
    return (api_version or "").rpartition("/")[0]


class OwnerChain:
    """pod → ReplicaSet → Deployment → ModelDeployment, each step the controller reference,
    checked against the object's real uid. Results are cached by namespace and uid (uids never
    change hands; a reference is only ever looked up in the referring object's namespace).
    Runs in the watch thread: ``get`` blocks."""

    def __init__(self, get: GetObject) -> None:
        self._get = get
        self._controller: dict[tuple[str, str], dict[str, Any] | None] = {}

    def model_deployment(self, pod: dict[str, Any]) -> tuple[str, str] | None:
        """(name, uid) of the ModelDeployment that owns ``pod``, or None."""
        namespace = _meta(pod).get("namespace") or ""
        ref = controller_of(pod)
        for kind, group in (("ReplicaSet", "apps"), ("Deployment", "apps")):
            if ref is None or ref.get("kind") != kind or _group(ref.get("apiVersion")) != group:
                return None
            ref = self._controller_of(kind, namespace, ref)
        if ref is None or ref.get("kind") != crd.KIND or _group(ref.get("apiVersion")) != crd.GROUP:
            return None
        return str(ref.get("name")), str(ref.get("uid"))

    def _controller_of(self, kind: str, namespace: str, ref: dict[str, Any]) -> dict[str, Any] | None:
        uid = ref.get("uid")
        if not uid:
            return None
        key = (namespace, str(uid))  # owner references never cross namespaces
        if key in self._controller:
            return self._controller[key]
        obj = self._get(kind, namespace, str(ref.get("name")))
        if obj is None or _meta(obj).get("uid") != uid:
            return None  # a reference to nothing, or to another object of that name: not cached
        if len(self._controller) >= _OWNER_CACHE_MAX:
            self._controller.clear()
        owner = controller_of(obj)
        self._controller[key] = owner
        return owner


# -- ModelDeployments -------------------------------------------------------------------------------


class RoutingError(ValueError):
    """A spec.routing that cannot be applied; the message names the field."""


def parse_routing(spec: dict[str, Any]) -> RoutingConfig:
    """``spec.routing`` as the router's RoutingConfig (the CRD's names, the operator's defaults)."""
    raw = spec.get("routing") or {}
    try:
        routing = RoutingSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden" and first["loc"][:1] == ("settings",):
            valid = ", ".join(RoutingSettings.model_fields)
            raise RoutingError(
                f"spec.routing.{where}: not a routing setting; valid settings: {valid}"
            ) from None
        if first["type"] == "value_error":  # a policy's own check; its message says what is wrong
            raise RoutingError(
                f"spec.routing.{where}: {first['msg'].removeprefix('Value error, ')}"
            ) from None
        raise RoutingError(f"spec.routing.{where}: {first['msg']} (got {first.get('input')!r})") from None
    config = routing.to_config()
    try:
        build_policy(config.policy, PrefixIndex(), config)
    except (KeyError, ValueError) as exc:
        raise RoutingError(f"spec.routing.policy: {exc}") from None
    return config


@dataclass
class ModelDeploymentView:
    """What the router takes from a ModelDeployment."""

    namespace: str
    name: str
    uid: str
    served_names: tuple[str, ...]
    block_size: int
    routing: RoutingConfig | None  # None: spec.routing is invalid (routing_error says why)
    routing_error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def identity(self) -> tuple[Any, ...]:
        """What a runtime is built from; when it changes the model is rebuilt."""
        return (self.uid, self.served_names, self.block_size)

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ModelDeploymentView:
        meta, spec = _meta(obj), obj.get("spec") or {}
        names = spec.get("servedModelNames") or [meta.get("name")]
        block_size = spec.get("blockSize", 16)
        if not isinstance(block_size, int) or block_size < 1:
            block_size = 16
        routing: RoutingConfig | None = None
        error = None
        try:
            routing = parse_routing(spec)
        except RoutingError as exc:
            error = str(exc)
        return cls(
            namespace=str(meta.get("namespace")),
            name=str(meta.get("name")),
            uid=str(meta.get("uid")),
            served_names=tuple(str(n) for n in names),
            block_size=block_size,
            routing=routing,
            routing_error=error,
        )


# -- sources ------------------------------------------------------------------------------------------


@dataclass
class ClusterSources:
    """What discovery reads from the API server; tests pass scripted ones."""

    pods: ListWatch
    models: ListWatch
    get: GetObject


def client_sources(api_client: Any, namespace: str | None, selector: str = WORKER_SELECTOR) -> ClusterSources:
    """Sources over the ``kubernetes`` client. RBAC needed: pods list/watch,
    modeldeployments list/watch, replicasets and deployments get (see the chart's router RBAC)."""
    from kubernetes import client

    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    if namespace:
        pods = ClientListWatch(core.list_namespaced_pod, namespace, label_selector=selector)
        models = ClientListWatch(
            custom.list_namespaced_custom_object, crd.GROUP, crd.VERSION, namespace, crd.PLURAL
        )
    else:
        pods = ClientListWatch(core.list_pod_for_all_namespaces, label_selector=selector)
        models = ClientListWatch(custom.list_cluster_custom_object, crd.GROUP, crd.VERSION, crd.PLURAL)
    readers = {"ReplicaSet": apps.read_namespaced_replica_set, "Deployment": apps.read_namespaced_deployment}

    def get(kind: str, ns: str, name: str) -> dict[str, Any] | None:
        import json

        from kubernetes.client.exceptions import ApiException

        try:
            resp = readers[kind](name, ns, _preload_content=False, _request_timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if resp.status == 404:
            return None
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=resp.reason, body=resp.data)
        return json.loads(resp.data)

    return ClusterSources(pods=pods, models=models, get=get)


def default_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


# -- discovery ----------------------------------------------------------------------------------------


@dataclass
class _Pod:
    obj: dict[str, Any]
    owner: tuple[str, str] | None  # (ModelDeployment name, uid) from the owner chain


class _Watching:
    """Two-thread plumbing shared by the discoveries: reflectors deliver on the event loop."""

    min_backoff_s = 0.5  # after a failed list or watch; doubles up to 30 s

    def __init__(self, watch_timeout_s: int) -> None:
        self.watch_timeout_s = watch_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reflectors: list[Reflector] = []

    def _post(self, handler: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(handler, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _watch(self, name: str, source: ListWatch, deliver: Callable[[str, Any], None]) -> None:
        reflector = Reflector(
            name, source, deliver, watch_timeout_s=self.watch_timeout_s, min_backoff_s=self.min_backoff_s
        )
        self._reflectors.append(reflector)
        reflector.start()

    async def _stop_watches(self) -> None:
        """Returns within seconds even with a watch parked in its long poll."""
        await asyncio.gather(*(asyncio.to_thread(r.stop, 3.0) for r in self._reflectors))


class KubernetesDiscovery(_Watching):
    """ModelDeployments and their worker pods, kept in the registry live."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: RouterMetrics,
        routing: RoutingConfig,
        *,
        namespace: str | None = None,
        sources: ClusterSources | None = None,
        api_client_factory: Callable[[], Any] | None = None,
        watch_timeout_s: int = 300,
        poll_interval_s: float = 0.5,
    ) -> None:
        super().__init__(watch_timeout_s)
        self.registry = registry
        self.metrics = metrics
        self.routing = routing  # the router's default, for a ModelDeployment without a valid one
        self.namespace = namespace
        self.poll_interval_s = poll_interval_s
        self._sources = sources
        self._api_client_factory = api_client_factory or default_api_client
        self._owners: OwnerChain | None = None
        self.models: dict[str, ModelDeploymentView] = {}
        self.pods: dict[str, _Pod] = {}
        self._owned: dict[str, tuple[Any, ...]] = {}  # runtime key -> the identity it was built from
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._logged: set[str] = set()
        self._models_synced = False
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._sources is None:
            api_client = await asyncio.to_thread(self._api_client_factory)
            self._sources = client_sources(api_client, self.namespace)
        self._owners = OwnerChain(self._sources.get)
        self._watch("modeldeployments", self._sources.models, self._deliver_models)
        self._watch("pods", self._sources.pods, self._deliver_pods)

    async def stop(self) -> None:
        self._stopped = True
        await self._stop_watches()
        for task in list(self._pending.values()):
            task.cancel()

    # -- thread side ------------------------------------------------------------------------------

    def _deliver_models(self, kind: str, payload: Any) -> None:
        self._post(self.on_models, kind, payload)

    def _deliver_pods(self, kind: str, payload: Any) -> None:
        """Resolve owners here (blocking GETs) so the loop only ever sees finished facts. An API
        error propagates: the reflector backs off and replays the event (or lists again)."""
        if kind == SYNC:
            resolved: Any = [_Pod(p, self._owner(p)) for p in payload]
        else:
            resolved = _Pod(payload, None if kind == "DELETED" else self._owner(payload))
        self._post(self.on_pods, kind, resolved)

    def _owner(self, pod: dict[str, Any]) -> tuple[str, str] | None:
        assert self._owners is not None
        return self._owners.model_deployment(pod)

    # -- loop side --------------------------------------------------------------------------------

    def _watched(self, obj: dict[str, Any]) -> bool:
        return not self.namespace or _meta(obj).get("namespace") == self.namespace

    def on_models(self, kind: str, payload: Any) -> None:
        if kind == SYNC:
            self._models_synced = True
            self.models = {}
            for obj in payload:
                if self._watched(obj):
                    view = ModelDeploymentView.parse(obj)
                    self.models[view.key] = view
        elif self._watched(payload):
            view = ModelDeploymentView.parse(payload)
            if kind == "DELETED":
                self.models.pop(view.key, None)
            else:
                self.models[view.key] = view
        for view in self.models.values():
            self._apply_routing(view)
        self.reconcile()

    def on_pods(self, kind: str, payload: Any) -> None:
        if kind == SYNC:  # the whole truth: pods missing from it are gone
            self.pods = {object_key(p.obj): p for p in payload if self._watched(p.obj)}
        elif self._watched(payload.obj):
            if kind == "DELETED":
                self.pods.pop(object_key(payload.obj), None)
            else:
                self.pods[object_key(payload.obj)] = payload
        else:
            self._log_once(
                f"foreign {object_key(payload.obj)}", "ignoring a pod outside the watched namespace"
            )
        self.reconcile()

    def targets(self) -> dict[str, dict[str, Role]]:
        """The routing targets the cluster asks for now: model key -> address -> role."""
        wanted: dict[str, dict[str, Role]] = {}
        for key, pod in self.pods.items():
            endpoint = pod_endpoint(pod.obj)
            if endpoint is None:
                continue
            namespace = _meta(pod.obj).get("namespace")
            if pod.owner is None:
                self._log_once(
                    f"untrusted {key} {_meta(pod.obj).get('uid')}",
                    "ignoring a pod with the worker labels that no ModelDeployment owns "
                    "(its ReplicaSet -> Deployment -> ModelDeployment chain does not check out)",
                    pod=key,
                )
                continue
            model = self.models.get(f"{namespace}/{pod.owner[0]}")
            if model is None or model.uid != pod.owner[1]:
                continue  # its ModelDeployment is not (yet, or any more) known: no traffic
            address, role = endpoint
            wanted.setdefault(model.key, {})[address] = role
        return wanted

    def reconcile(self) -> None:
        """Make the registry match ``targets()``: synchronous, so events apply in order."""
        if not self._models_synced or self._stopped:
            return  # pods are judged against the ModelDeployments: wait for their first list
        wanted = self.targets()
        for key in list(self._owned):
            model = self.models.get(key)
            if model is None or model.identity != self._owned[key]:
                self._drop_model(key)
        for key, workers in wanted.items():
            runtime = self.registry.models.get(key) if key in self._owned else None
            if runtime is None:
                self._create_soon(key, workers)
                continue
            for address in list(runtime.clients):
                if address not in workers:
                    runtime.detach_worker(address, WORKER_DRAIN_S)
            for address, role in workers.items():
                runtime.add_worker(address, role)
        for key in self._owned:
            if key not in wanted:
                runtime = self.registry.models[key]
                for address in list(runtime.clients):
                    runtime.detach_worker(address, WORKER_DRAIN_S)

    def _drop_model(self, key: str) -> None:
        self._owned.pop(key, None)
        runtime = self.registry.models.pop(key, None)
        if runtime is not None:
            for address in list(runtime.clients):
                runtime.detach_worker(address, WORKER_DRAIN_S)
            log.info("model removed", extra={"model": key})

    def _apply_routing(self, model: ModelDeploymentView) -> None:
        runtime = self.registry.models.get(model.key) if model.key in self._owned else None
        if model.routing_error is not None:
            kept = runtime.routing.policy if runtime is not None else self.routing.policy
            self._log_once(
                f"routing {model.key} {model.routing_error}",
                "invalid routing in the ModelDeployment; keeping the last good routing",
                model=model.key,
                error=model.routing_error,
                policy=kept,
            )
            return
        if runtime is not None and model.routing is not None:
            try:
                runtime.set_routing(model.routing)
            except ValueError as exc:
                self._log_once(
                    f"routing {model.key} {exc}",
                    "invalid routing in the ModelDeployment; keeping the last good routing",
                    model=model.key,
                    error=f"spec.routing.{exc}",
                )

    def _create_soon(self, key: str, workers: dict[str, Role]) -> None:
        if key not in self._pending:
            task = asyncio.get_running_loop().create_task(self._create_model(key, list(workers)))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))

    async def _create_model(self, key: str, addresses: list[str]) -> None:
        """The first worker of a model brings its tokenizer (GetModelInfo), after saying it
        serves what the ModelDeployment describes."""
        model = self.models.get(key)
        if model is None:
            return
        expected = frozenset(model.served_names)
        for address in addresses:
            probe = WorkerClient(address, Role.BOTH)
            try:
                info = await probe.model_info()
                if info.model not in expected or info.block_size != model.block_size:
                    self._log_once(
                        f"mismatch {address} {info.model} {info.block_size}",
                        "worker is not what its ModelDeployment describes; not routing to it",
                        model=key,
                        worker=address,
                        error=f"serves {info.model!r} with block size {info.block_size}, expected one "
                        f"of {sorted(expected)} with block size {model.block_size}",
                    )
                    continue
                tokenizer = ModelTokenizer(dict(info.files))
            except Exception as exc:  # noqa: BLE001 - unreachable, no tokenizer files, ...
                log.warning("could not fetch model info", extra={"worker": address, "error": str(exc)})
                continue
            finally:
                await probe.close()
            current = self.models.get(key)
            if current is None or current.identity != model.identity:
                return  # changed while we asked; the next reconcile starts over
            self._add_runtime(model, tokenizer, info.max_model_len or None)
            self.reconcile()
            return
        # No worker could vouch for the model yet (starting, unreachable): look again later,
        # or at once when workers came up meanwhile that were not asked.
        untried = set(self.targets().get(key, {})) - set(addresses)
        asyncio.get_running_loop().call_later(0.05 if untried else RETRY_MODEL_S, self.reconcile)

    def _add_runtime(
        self, model: ModelDeploymentView, tokenizer: ModelTokenizer, max_len: int | None
    ) -> None:
        if model.routing is None:
            self._apply_routing(model)  # logs why the router default is used
        names = model.served_names
        aliases = tuple(dict.fromkeys([*names, *(f"{model.namespace}/{n}" for n in names)]))
        runtime = ModelRuntime(
            names[0],
            tokenizer,
            block_size=model.block_size,
            routing=model.routing or self.routing,
            metrics=self.metrics,
            max_model_len=max_len,
            poll_interval_s=self.poll_interval_s,
            key=model.key,
            aliases=aliases,
            expect_model=frozenset(names),
        )
        self.registry.add(runtime)
        self._owned[model.key] = model.identity
        log.info("model discovered", extra={"model": model.key, "served_names": list(names)})
        for name in names:
            owners = self.registry.serving(name)
            if len(owners) > 1:
                self._log_once(
                    f"ambiguous {name} {sorted(o.key for o in owners)}",
                    "a model name is served by several ModelDeployments; clients must ask for one "
                    "by namespace/name",
                    model=name,
                    deployments=sorted(o.key for o in owners),
                )

    def _log_once(self, key: str, message: str, **extra: Any) -> None:
        if key in self._logged:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.add(key)
        log.warning(message, extra=extra)


class PodSelectorWatch(_Watching):
    """The pods a label selector matches, in one namespace or all, delivered in order to
    ``on_pods`` on the event loop. Subclasses say what the pods serve."""

    def __init__(
        self,
        selector: str,
        *,
        namespace: str | None = None,
        source: ListWatch | None = None,
        api_client_factory: Callable[[], Any] | None = None,
        watch_timeout_s: int = 300,
    ) -> None:
        super().__init__(watch_timeout_s)
        self.selector = selector
        self.namespace = namespace
        self.source = source
        self._api_client_factory = api_client_factory or default_api_client
        self.pods: dict[str, dict[str, Any]] = {}

    def watch_name(self) -> str:
        return f"pods matching {self.selector}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.source is None:
            api_client = await asyncio.to_thread(self._api_client_factory)
            self.source = pod_list_watch(api_client, self.namespace, self.selector)
        self._watch(self.watch_name(), self.source, lambda kind, p: self._post(self.on_pods, kind, p))

    async def stop(self) -> None:
        await self._stop_watches()

    def on_pods(self, kind: str, payload: Any) -> None:
        raise NotImplementedError


class SelectorDiscovery(PodSelectorWatch):
    """Pods found by a config route's ``kubernetes_selector`` serve that configured model.
    The admin chose the selector; no ownership is required. Events apply in order as above."""

    def __init__(
        self,
        registry: ModelRegistry,
        model: str,
        *,
        selector: str,
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
        self.registry = registry
        self.model = model

    def watch_name(self) -> str:
        return f"pods of {self.model}"

    def on_pods(self, kind: str, payload: Any) -> None:
        if kind == SYNC:
            self.pods = {object_key(p): p for p in payload}
        elif kind == "DELETED":
            self.pods.pop(object_key(payload), None)
        else:
            self.pods[object_key(payload)] = payload
        runtime = self.registry.models.get(self.model)
        if runtime is None:
            return
        wanted = dict(e for e in map(pod_endpoint, self.pods.values()) if e is not None)
        for address in list(runtime.clients):
            if address not in wanted:
                runtime.detach_worker(address, WORKER_DRAIN_S)
        for address, role in wanted.items():
            runtime.add_worker(address, role)


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
