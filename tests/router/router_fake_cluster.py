"""A scripted API server for discovery tests: pods and ModelDeployments with resourceVersions,
an event history that can be compacted (the next watch from before it gets 410 Gone), an outage
switch (watches drop, lists fail: a gap) and GETs of ReplicaSets and Deployments for the owner
chain. Objects are plain dicts, as the router reads them."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from tusk.operator import schema
from tusk.router.discovery import ClusterSources
from tusk.router.kube import Gone


class FakeCluster:
    def __init__(self) -> None:
        self.version = 100
        self.objects: dict[str, dict[str, dict[str, Any]]] = {
            k: {} for k in ("pods", "models", "ReplicaSet", "Deployment")
        }
        self.history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {"pods": [], "models": []}
        self.compacted = 0  # watches from a version below this get 410 Gone
        self.down = False
        self.failing_gets = 0  # the next GETs that fail (an API server hiccup)
        self.lists = {"pods": 0, "models": 0}
        self._epoch = 0  # bumped to cut every open watch
        self.cond = threading.Condition()

    # -- writing (the test's side) -------------------------------------------------------------

    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            meta = obj.setdefault("metadata", {})
            key = f"{meta.get('namespace')}/{meta['name']}"
            known = self.objects[kind].get(key)
            meta.setdefault("uid", known["metadata"]["uid"] if known else str(uuid.uuid4()))
            self.version += 1
            meta["resourceVersion"] = str(self.version)
            event = "MODIFIED" if key in self.objects[kind] else "ADDED"
            self.objects[kind][key] = copy.deepcopy(obj)
            if kind in self.history:
                self.history[kind].append((self.version, event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return obj

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self.cond:
            obj = self.objects[kind].pop(f"{namespace}/{name}")
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.history[kind].append((self.version, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the event history so far, as etcd compaction does."""
        with self.cond:
            self.compacted = self.version + 1
            for events in self.history.values():
                events.clear()

    def outage(self, down: bool) -> None:
        with self.cond:
            self.down = down
            self._epoch += 1
            self.cond.notify_all()

    # -- a ModelDeployment and its chain --------------------------------------------------------------

    def model_deployment(self, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
        return self.put(
            "models",
            {
                "apiVersion": f"{schema.GROUP}/{schema.VERSION}",
                "kind": schema.KIND,
                "metadata": {"namespace": namespace, "name": name},
                "spec": {"model": {"source": "tiny"}, **spec},
            },
        )

    def replica_set_of(self, md: dict[str, Any], role: str = "decode") -> dict[str, Any]:
        """A Deployment owned by ``md`` and a ReplicaSet owned by that Deployment."""
        meta = md["metadata"]
        ns = meta["namespace"]
        dep = self._child("Deployment", ns, f"{meta['name']}-{role}", md)
        return self._child("ReplicaSet", ns, f"{meta['name']}-{role}-5d8f", dep)

    def _child(self, kind: str, ns: str, name: str, owner: dict[str, Any]) -> dict[str, Any]:
        obj = {
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": {
                "namespace": ns,
                "name": name,
                "uid": str(uuid.uuid4()),
                "ownerReferences": [owner_ref(owner)],
            },
        }
        self.objects[kind][f"{ns}/{name}"] = obj
        return obj

    # -- reading (the router's side) ------------------------------------------------------------

    def sources(self) -> ClusterSources:
        return ClusterSources(
            pods=FakeListWatch(self, "pods"), models=FakeListWatch(self, "models"), get=self.get
        )

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            if self.down or self.failing_gets > 0:
                self.failing_gets -= 1
                raise ConnectionError("API server unreachable")
            obj = self.objects[kind].get(f"{namespace}/{name}")
            return copy.deepcopy(obj) if obj is not None else None


def owner_ref(owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }


class FakeListWatch:
    def __init__(self, cluster: FakeCluster, kind: str) -> None:
        self.cluster = cluster
        self.kind = kind
        self.cancelled = False

    def list(self) -> tuple[list[dict[str, Any]], str]:
        c = self.cluster
        with c.cond:
            if c.down:
                raise ConnectionError("API server unreachable")
            c.lists[self.kind] += 1
            return copy.deepcopy(list(c.objects[self.kind].values())), str(c.version)

    def watch(self, resource_version: str, timeout_s: int) -> Iterator[dict[str, Any]]:
        c = self.cluster
        sent = int(resource_version)
        deadline = time.monotonic() + timeout_s
        with c.cond:
            if c.down:
                raise ConnectionError("API server unreachable")
            if sent < c.compacted - 1:
                raise Gone("410 too old resource version")
            epoch = c._epoch
        while True:
            with c.cond:
                if self.cancelled or c._epoch != epoch:
                    return  # cut: what happens from now on is replayed to the next watch
                events = [e for e in c.history[self.kind] if e[0] > sent]
                if not events:
                    if time.monotonic() > deadline:
                        return
                    c.cond.wait(0.05)
                    continue
            for version, kind, obj in events:
                sent = version
                yield {"type": kind, "object": copy.deepcopy(obj)}

    def cancel(self) -> None:
        self.cancelled = True
        with self.cluster.cond:
            self.cluster.cond.notify_all()
