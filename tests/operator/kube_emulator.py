"""kmock's Kubernetes emulator, extended with what a kopf operator relies on.

kmock 0.8 stores objects as plain JSON. A real API server also stamps server-owned metadata on
every write (uid, resourceVersion, creationTimestamp, generation), resolves ``generateName``,
takes the namespace from the URL, answers a failed JSON-patch ``test`` with 422 and keeps the
status subresource apart from the main resource. kopf depends on each of these (finalizer
patches test resourceVersion; ownerReferences need a uid), so this subclass adds them.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import secrets
import uuid
from typing import Any

import jsonpatch
import jsonpointer
import kmock
from kmock._internal import dicts, enums

# Resources whose status is a subresource: writes to the main resource ignore status, /status
# writes change only status (as the API server does for CRDs with subresources.status).
STATUS_SUBRESOURCE = {("tusk.dev", "modeldeployments"), ("apps", "deployments")}


class ClusterEmulator(kmock.KubernetesEmulator):
    _versions = itertools.count(1000)

    def _next_version(self) -> str:
        return str(next(self._versions))

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
            if status_only and request.subresource == "status":
                patch = {k: v for k, v in patch.items() if k == "status"}
            elif status_only:
                patch = {k: v for k, v in patch.items() if k != "status"}
            request.data.clear()
            request.data.update(patch)
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

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None:
            if request.action == enums.action.CREATE:
                self._stamp_create(request)
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
