"""A small dict-in, dict-out Kubernetes client for the handlers.

The desired state is plain dicts, so the client speaks plain dicts too: one generic path per
kind instead of a typed API class per group, and no model (de)serialisation on every call. It
wraps the official client's transport (auth, TLS, kubeconfig) and runs the blocking calls in
threads so the kopf event loop keeps serving other objects.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import Any

import kubernetes
import urllib3

# kind -> (API prefix, plural, namespaced)
KINDS: dict[str, tuple[str, str, bool]] = {
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Service": ("/api/v1", "services", True),
    "Secret": ("/api/v1", "secrets", True),
    "Node": ("/api/v1", "nodes", False),
    "Pod": ("/api/v1", "pods", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases", True),
    "ModelDeployment": ("/apis/tusk.dev/v1alpha1", "modeldeployments", True),
    "InferencePool": ("/apis/inference.networking.k8s.io/v1", "inferencepools", True),
}

MERGE_PATCH = "application/merge-patch+json"
# Ask for metadata only (the server then never sends a Secret's data); plain JSON as the fallback.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


@dataclass
class ApiError(Exception):
    """An API call that failed; ``status`` is the HTTP code (0 when the server was not reached)."""

    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"

    @property
    def transient(self) -> bool:
        """Worth retrying: throttling, server trouble, conflicts on stale writes, no connection."""
        return self.status in (0, 409, 429) or self.status >= 500


def load_api_client() -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config (read now)."""
    configuration = kubernetes.client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        path = os.environ.get("KUBECONFIG", os.path.expanduser("~/.kube/config")).split(os.pathsep)[0]
        kubernetes.config.load_kube_config(config_file=path, client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def path_for(kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix, plural, namespaced = KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient, timeout_s: float = 30.0) -> None:
        self.api = api_client
        self.timeout_s = timeout_s

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        method_, url, headers, body_, post = self.api.param_serialize(
            method,
            path,
            query_params=query or None,
            header_params={"Accept": accept, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(method_, url, headers, body_, post, _request_timeout=self.timeout_s)
            data = response.read()
        except kubernetes.client.ApiException as exc:
            raise ApiError(exc.status or 0, str(exc.reason or "")[:200], str(exc.body or "")[:500]) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, type(exc).__name__, str(exc)[:500]) from None
        if response.status >= 400:
            text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise ApiError(response.status, response.reason or "", str(message)[:500])
        return json.loads(data) if data else None

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        return await asyncio.to_thread(self._call, method, path, body, content_type, accept, query)

    async def get(
        self, kind: str, namespace: str | None, name: str, metadata_only: bool = False
    ) -> dict[str, Any] | None:
        """The object (only its metadata when asked), or None when it does not exist."""
        try:
            found = await self.call(
                "GET",
                path_for(kind, namespace, name),
                accept=METADATA_ONLY if metadata_only else "application/json",
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        if metadata_only and isinstance(found, dict):
            # A server that ignores the metadata-only request sends the whole object: keep only the
            # metadata, so no caller ever holds Secret data.
            return {"kind": kind, "metadata": found.get("metadata") or {}}
        return found

    async def list(
        self, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else None
        items = (await self.call("GET", path_for(kind, namespace), query=query) or {}).get("items", [])
        if label_selector:  # servers honour the selector; filtering again costs nothing
            wanted = dict(part.split("=", 1) for part in label_selector.split(","))
            items = [
                item
                for item in items
                if wanted.items() <= ((item.get("metadata") or {}).get("labels") or {}).items()
            ]
        return items

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", path_for(obj["kind"], obj["metadata"].get("namespace")), obj)

    async def patch(
        self, kind: str, namespace: str | None, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        return await self.call("PATCH", path_for(kind, namespace, name), patch, MERGE_PATCH)

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """True if deleted now, False if it was already gone."""
        try:
            await self.call("DELETE", path_for(kind, namespace, name), {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
