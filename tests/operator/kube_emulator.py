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
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import dicts, enums

# Resources whose status is a subresource: writes to the main resource ignore status, /status
# writes change only status (as the API server does for CRDs with subresources.status).
STATUS_SUBRESOURCE = {("tusk.dev", "modeldeployments"), ("apps", "deployments")}


class ClusterEmulator(kmock.KubernetesEmulator):
    _last_version = 999

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.creations: list[tuple[Any, str | None, str | None]] = []

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

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock matches each request against its whole request log (quadratic: 100 objects took
        # minutes); only recent requests can still be in flight, so the log is kept short and
        # creations are recorded separately for the duplicate checks.
        del self._requests[:-64]
        if request.resource is not None:
            if request.action == enums.action.CREATE:
                self._stamp_create(request)
                if isinstance(request.data, dict):
                    meta = request.data.get("metadata", {})
                    self.creations.append((request.resource, meta.get("namespace"), meta.get("name")))
            elif request.action == enums.action.UPDATE and request.name is not None:
                async with self._lock:
                    self._stamp_update(request)
        return await super()._handle(request)


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
