"""Run the real tusk kopf operator in a thread against the in-process emulator.

The emulator serves from the test's event loop, so the operator gets its own thread and loop
(kopf.operator() inside pytest's loop would cancel pytest-asyncio's tasks on exit), and no
KopfRunner (it swaps sys.stdout for the whole process).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf
from kube_emulator import ClusterEmulator
from tusk.operator import handlers
from tusk.operator.schema import GROUP, PLURAL, VERSION

MD_RESOURCE = f"{GROUP}/{VERSION}/{PLURAL}"


class OperatorThread:
    def __init__(self, options: handlers.Options) -> None:
        self.options = options
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tusk-operator", daemon=True)

    def _run(self) -> None:
        handlers.OPTIONS = self.options
        try:
            asyncio.run(
                kopf.operator(
                    standalone=True,
                    clusterwide=True,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    async def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.ready_flag.is_set():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"operator did not start: {self.error!r}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.stop_flag.set()
        deadline = time.monotonic() + 20
        while self.thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not self.thread.is_alive(), "operator did not stop"
        assert self.error is None, f"operator failed: {self.error!r}"


class Cluster:
    """Helpers over the emulator: write through HTTP (so watches fire), read its store directly."""

    def __init__(self, emulator: ClusterEmulator, session: aiohttp.ClientSession) -> None:
        self.emulator, self.session = emulator, session

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        async with self.session.request(
            method, path, json=body, headers={"Content-Type": content_type}
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise AssertionError(f"{method} {path} -> {resp.status}: {data}")
            return data

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body)

    async def create_md(self, name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": spec,
        }
        return await self.create(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", body)

    async def patch_md(self, name: str, patch: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        return await self.request("PATCH", path, patch, "application/merge-patch+json")

    async def delete_md(self, name: str, namespace: str = "default") -> None:
        await self.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    def _find(self, resource: str, namespace: str | None, name: str) -> Any:
        for (res, ns, obj_name), obj in self.emulator.objects.items():
            if obj_name == name and ns == namespace and _resource_name(res) == resource and not obj.deleted:
                return obj
        return None

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self._find(resource, namespace, name)
        return None if obj is None else obj.raw

    def md(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.get(MD_RESOURCE, namespace, name)

    def deployment(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.get("apps/v1/deployments", namespace, name)

    def condition(self, md_name: str, kind: str, namespace: str = "default") -> dict[str, Any] | None:
        md = self.md(md_name, namespace) or {}
        return next((c for c in (md.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)

    def live_objects(self, resource: str) -> list[dict[str, Any]]:
        found = []
        for key, obj in self.emulator.objects.items():
            if not obj.deleted and _resource_name(key[0]) == resource:
                found.append(obj.raw)
        return found

    def events(self, involved: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.live_objects("v1/events")
            if involved is None or e["involvedObject"]["name"] == involved
        ]

    def creations(self, resource: str) -> list[str]:
        """Names of every object created through the API (duplicates show double creation)."""
        return [name for res, _, name in self.emulator.creations if _resource_name(res) == resource]

    def set_ready(self, deployment_name: str, namespace: str = "default") -> None:
        """Play the Deployment controller: every desired replica updated, ready and available."""
        obj = self._find("apps/v1/deployments", namespace, deployment_name)
        replicas = obj.raw["spec"].get("replicas", 1)
        gen = obj.raw["metadata"].get("generation", 1)
        counts = {k: replicas for k in ("replicas", "readyReplicas", "updatedReplicas", "availableReplicas")}
        obj.patch({"status": {"observedGeneration": gen, **counts}})


def _resource_name(resource: Any) -> str:
    group = resource.group
    return (
        f"{group}/{resource.version}/{resource.plural}" if group else f"{resource.version}/{resource.plural}"
    )


async def eventually(
    check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll until ``check()`` is truthy; the emulator keeps serving meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(interval)
