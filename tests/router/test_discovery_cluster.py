"""Kubernetes discovery with the real ``kubernetes`` client against the emulated API server the
operator tests use (it stamps uids and resourceVersions): ModelDeployments through the custom
objects API, the owner chain through ReplicaSet and Deployment GETs, pods through a watch."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import httpx
from test_discovery_watch import pod, wait
from tusk.operator import schema
from tusk.router.discovery import KubernetesDiscovery

from tusk.config import RoutingConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))


def _owner(obj: dict) -> dict:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
    }


def _read(read, name: str, kind: str) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        **json.loads(read(name, "ml", _preload_content=False).data),
    }


def test_discovery_with_the_kubernetes_client(harness) -> None:
    import kmock
    from kube_emulator import ClusterEmulator, declare_resources
    from kubernetes import client as k8s

    stack = contextlib.AsyncExitStack()

    async def start_emulator() -> str:
        emulator = await stack.enter_async_context(ClusterEmulator())
        server = await stack.enter_async_context(kmock.Server(emulator))
        declare_resources(emulator)
        return str(server.url).rstrip("/")

    url = harness.run(start_emulator())

    def api_client() -> k8s.ApiClient:
        return k8s.ApiClient(k8s.Configuration(host=url))

    api = api_client()
    core, apps, custom = k8s.CoreV1Api(api), k8s.AppsV1Api(api), k8s.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(
        schema.GROUP,
        schema.VERSION,
        "ml",
        schema.PLURAL,
        {
            "apiVersion": f"{schema.GROUP}/{schema.VERSION}",
            "kind": schema.KIND,
            "metadata": {"name": "llama"},
            "spec": {"model": {"source": "tiny"}, "routing": {"policy": "least_request"}},
        },
    )
    md = custom.get_namespaced_custom_object(schema.GROUP, schema.VERSION, "ml", schema.PLURAL, "llama")
    template = {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "w", "image": "x"}]}}
    apps.create_namespaced_deployment(
        "ml",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "llama-decode", "ownerReferences": [_owner(md)]},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": template},
        },
        _preload_content=False,
    )
    dep = _read(apps.read_namespaced_deployment, "llama-decode", "Deployment")
    apps.create_namespaced_replica_set(
        "ml",
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": "llama-decode-5d8f", "ownerReferences": [_owner(dep)]},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": template},
        },
        _preload_content=False,
    )
    rs = _read(apps.read_namespaced_replica_set, "llama-decode-5d8f", "ReplicaSet")
    _, endpoint = harness.worker(model="llama", tokenizer_dir=harness.tokenizer_dir)
    _, stranger = harness.worker(model="llama", tokenizer_dir=harness.tokenizer_dir)
    router, router_url = harness.router([], wait_ready=False)
    disc = KubernetesDiscovery(
        router.registry,
        router.metrics,
        RoutingConfig(policy="round_robin"),
        namespace="ml",
        api_client_factory=api_client,
        poll_interval_s=0.1,
    )
    harness.run(disc.start())
    try:
        owned = pod("ml", "w-1", endpoint.address, None)
        owned["metadata"]["ownerReferences"] = [_owner(rs)]
        core.create_namespaced_pod("ml", owned)
        core.create_namespaced_pod("ml", pod("ml", "w-2", stranger.address, None))  # labels only
        wait(lambda: "ml/llama" in router.registry.models, "model never discovered")
        runtime = router.registry.models["ml/llama"]
        wait(runtime.can_serve, "worker never ready")
        assert set(runtime.clients) == {endpoint.address}
        assert runtime.default_policy.name == "least_request"
        body = {"model": "llama", "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{router_url}/v1/completions", json=body).status_code == 200
        core.delete_namespaced_pod("w-1", "ml")
        wait(lambda: not runtime.clients, "deleted pod never left")
    finally:
        started = time.monotonic()
        harness.run(disc.stop(), timeout=30)
        assert time.monotonic() - started < 10  # the watches were parked in long polls
        harness.run(stack.aclose())
