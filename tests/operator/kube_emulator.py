"""kmock's Kubernetes emulator, extended with what a kopf operator relies on.

kmock 0.8 stores objects as plain JSON. A real API server also stamps server-owned metadata on
every write (uid, resourceVersion, creationTimestamp, generation), resolves ``generateName``,
takes the namespace from the URL, answers a failed JSON-patch ``test`` with 422 and keeps the
status subresource apart from the main resource. kopf depends on each of these (finalizer
patches test resourceVersion; ownerReferences need a uid), so this subclass adds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import decimal
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import jsonpatch
import jsonpointer
import kmock
import kubernetes.utils
from kmock._internal import dicts, enums

_BINARY = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
_DECIMAL = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}


def canonical_quantity(value: Any) -> str:
    """A quantity as the API server stores it (resource.Quantity's canonical form).

    The format follows the suffix written (binary Ki..Ei, decimal exponent e/E, else decimal SI);
    binary amounts below 1024 or with a fraction fall back to decimal SI; the mantissa is the
    smallest integer with the largest exponent (a multiple of 3, or a power of 1024). So "0.5"
    becomes "500m", "2048Mi" "2Gi", "1.5Gi" "1536Mi", 1000 "1k" and 2 "2".
    """
    text = str(value).strip()
    amount = decimal.Decimal(kubernetes.utils.parse_quantity(text))
    binary = text.endswith(tuple(_BINARY[1:]))
    exponent_format = not binary and any(c in text for c in "eE") and not text.endswith("E")
    if binary and abs(amount) >= 1024 and amount == amount.to_integral_value():
        whole, power = int(amount), 0
        while power < 6 and whole % 1024 == 0 and whole != 0:
            whole, power = whole // 1024, power + 1
        return f"{whole}{_BINARY[power]}"
    # Decimal: round up to nano units, then take the largest exponent (multiple of 3) that stays whole.
    nanos = int((amount * 10**9).to_integral_value(rounding=decimal.ROUND_CEILING))
    exponent = -9
    while nanos != 0 and nanos % 1000 == 0 and exponent < 18:
        nanos, exponent = nanos // 1000, exponent + 3
    if exponent_format:
        return f"{nanos}e{exponent}" if exponent else str(nanos)
    return f"{nanos}{_DECIMAL[exponent]}"


def canonicalise_quantities(obj: Any, quantity: bool = False) -> Any:
    """Rewrite container resources and emptyDir sizeLimits in place, as the server does on write."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if value is None:
                continue
            if quantity or key == "sizeLimit":
                obj[key] = canonical_quantity(value) if not isinstance(value, dict | list) else value
            else:
                canonicalise_quantities(value, key in ("limits", "requests") and isinstance(value, dict))
    elif isinstance(obj, list):
        for item in obj:
            canonicalise_quantities(item)
    return obj


# Resources whose status is a subresource: writes to the main resource ignore status, /status
# writes change only status (as the API server does for CRDs with subresources.status).
STATUS_SUBRESOURCE = {("tusk.dev", "modeldeployments"), ("apps", "deployments")}


class ClusterEmulator(kmock.KubernetesEmulator):
    _last_version = 999

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.creations: list[tuple[Any, str | None, str | None]] = []
        # Every write: (action, resource, namespace, name, bearer token) - who changed what.
        self.writes: list[tuple[str, str, str | None, str | None, str]] = []
        # Every call as RBAC sees it: (verb, API group, resource[/subresource], bearer token).
        self.calls: set[tuple[str, str, str, str]] = set()

    def _next_version(self) -> str:
        self._last_version += 1
        return str(self._last_version)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """A list carries the current resourceVersion, so a watch can continue from it."""
        async with self._lock:
            version = str(self._last_version)
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = version
        return result

    def _stamp_create(self, request: kmock.Request) -> None:
        if not isinstance(request.data, dict):
            return
        meta = request.data.setdefault("metadata", {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_version()
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)

    def _stamp_update(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # the base class answers 404
        current = copy.deepcopy(self.objects[key].raw)
        patch = request.data
        status_only = (request.resource.group, request.resource.plural) in STATUS_SUBRESOURCE
        if isinstance(patch, list):
            try:
                updated = jsonpatch.apply_patch(current, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=f"the patch failed: {exc}"
                ) from None
        elif isinstance(patch, dict):
            expected = (patch.get("metadata") or {}).get("resourceVersion")
            if expected is not None and expected != current.get("metadata", {}).get("resourceVersion"):
                # A resourceVersion in a patch is a precondition (optimistic concurrency).
                raise kmock.KubernetesError(
                    status=409, reason="Conflict", message="the object has been modified; please retry"
                )
            if status_only:
                keep = (
                    (lambda k: k == "status")
                    if request.subresource == "status"
                    else (lambda k: k != "status")
                )
                for key in [k for k in patch if not keep(k)]:
                    del patch[key]
            updated = dicts.merge_patch_dict(current, patch)
        else:
            return
        stamp: dict[str, Any] = {"resourceVersion": self._next_version()}
        if updated.get("spec") != current.get("spec"):
            stamp["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        if isinstance(patch, list):
            for field, value in stamp.items():
                patch.append({"op": "add", "path": f"/metadata/{field}", "value": value})
        else:
            request.data.setdefault("metadata", {}).update(stamp)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve ``/api/v1/namespaces`` itself: kmock 0.8 cannot parse that path (kopf's namespace
        observer lists and watches it in namespace-scoped mode)."""
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            return await super().__call__(raw_request)
        watching = raw_request.query.get("watch") in ("true", "1")
        token = (raw_request.headers.get("Authorization") or "").removeprefix("Bearer ")
        self.calls.add(("watch" if watching else "list", "", "namespaces", token))
        names = sorted({ns for (_, ns, _), obj in self.objects.items() if ns and not obj.deleted})
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
        if raw_request.query.get("watch") not in ("true", "1"):
            body = {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._last_version)},
            }
            return aiohttp.web.json_response({**body, "items": items})
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        try:
            while True:  # no namespace events are emulated; hold the stream until the client leaves
                await asyncio.sleep(3600)
        finally:
            with contextlib.suppress(Exception):
                await response.write_eof()

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """Like the base class, but subscribes before the snapshot, so no write between them is lost.

        The base class replays the stored objects first and subscribes to the event bus only
        after the client read them; a patch made in that window (kopf adds its finalizer right
        after the replay) never reached the watcher, and kopf then waited for a change forever.
        """
        yield b""
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion") or "0"
        since_version = int(since) if since.isdigit() else 0
        async with self._lock:
            objects = [o for o in self._KubernetesEmulator__get_objs(request, strict=False) if not o.deleted]
            # A watch from a list's version gets only what changed after it (no history is kept,
            # so a change shows as the object's current state); a bare watch gets everything.
            replay = [
                {"type": "ADDED" if since_version == 0 else "MODIFIED", "object": o.raw}
                for o in objects
                if int(o.raw.get("metadata", {}).get("resourceVersion") or 0) > since_version
            ]
            marker = await bus.mark()
        try:
            for event in replay:
                yield event
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._KubernetesEmulator__check(
                    request, request.resource, meta.get("namespace"), meta.get("name"), strict=False
                ):
                    yield event
        finally:
            await bus.unmark(marker)

    async def _replace(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """PUT on a named object (kmock 0.8 routes none): a whole-object update whose
        metadata.resourceVersion is a precondition, as the API server does it (leader election)."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesError(
                    status=404, reason="NotFound", message=f"{request.name} not found"
                )
            obj, new = self.objects[key], copy.deepcopy(request.data)
            current = obj.raw
            meta = current.get("metadata", {})
            expected = (new.get("metadata") or {}).get("resourceVersion")
            if expected is not None and expected != meta.get("resourceVersion"):
                raise kmock.KubernetesError(
                    status=409, reason="Conflict", message="the object has been modified; please retry"
                )
            new["metadata"] = {
                **(new.get("metadata") or {}),
                **{k: meta[k] for k in ("uid", "creationTimestamp", "namespace", "name") if k in meta},
                "resourceVersion": self._next_version(),
                "generation": int(meta.get("generation") or 1) + (new.get("spec") != current.get("spec")),
            }
            obj.patch({k: None for k in current if k != "metadata"})
            obj.patch(new)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
            return aiohttp.web.json_response(obj.raw)

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock matches each request against its whole request log (quadratic: 100 objects took
        # minutes); only recent requests can still be in flight, so the log is kept short and
        # creations are recorded separately for the duplicate checks.
        del self._requests[:-64]
        if request.resource is not None and request.resource.plural:
            verb = _VERBS.get(request.action, "update" if request.method == enums.method.PUT else "?")
            if request.action == enums.action.UPDATE and request.method == enums.method.PUT:
                verb = "update"
            plural = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
            self.calls.add((verb, request.resource.group or "", plural, token))
        if request.method == enums.method.PUT and request.resource is not None and request.name:
            token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
            self.writes.append(
                ("REPLACE", _resource_id(request.resource), request.namespace, request.name, token)
            )
            return await self._replace(request)
        if request.resource is not None and request.action in (
            enums.action.CREATE,
            enums.action.UPDATE,
            enums.action.DELETE,
        ):
            token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
            name = request.name
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("metadata") or {}).get("name")
            self.writes.append(
                (
                    str(request.action.name),
                    _resource_id(request.resource),
                    request.namespace,
                    name,
                    token,
                )
            )
        if request.resource is not None:
            if request.resource.group != "tusk.dev" and isinstance(request.data, dict | list):
                # Custom resources keep what was written; built-in kinds store canonical quantities.
                canonicalise_quantities(request.data)
            if request.action == enums.action.CREATE:
                self._stamp_create(request)
                if isinstance(request.data, dict):
                    meta = request.data.get("metadata", {})
                    self.creations.append((request.resource, meta.get("namespace"), meta.get("name")))
            elif request.action == enums.action.UPDATE and request.name is not None:
                async with self._lock:
                    self._stamp_update(request)
        return await super()._handle(request)


_VERBS = {
    enums.action.LIST: "list",
    enums.action.WATCH: "watch",
    enums.action.FETCH: "get",
    enums.action.CREATE: "create",
    enums.action.UPDATE: "patch",
    enums.action.DELETE: "delete",
}


def _resource_id(resource: Any) -> str:
    group = resource.group
    return (
        f"{group}/{resource.version}/{resource.plural}" if group else f"{resource.version}/{resource.plural}"
    )


def declare_resources(emulator: ClusterEmulator) -> None:
    """Built-in resources plus the ModelDeployment CRD (creating a CRD object does not register it)."""
    emulator.resources.load_bundled()
    emulator.resources["tusk.dev/v1alpha1/modeldeployments"] = kmock.ResourceInfo(
        kind="ModelDeployment",
        singular="modeldeployment",
        namespaced=True,
        shortnames={"md"},
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        subresources={"status", "scale"},
    )
    # Leader election's Lease (bundled with kmock's built-ins today; declared so it stays).
    emulator.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
        kind="Lease",
        singular="lease",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
    )
