"""Kubernetes discovery: pods -> endpoints as a pure function, and the event handler that adds
and removes workers (and fetches a new model's tokenizer over GetModelInfo) without a restart."""

from __future__ import annotations

import time

import httpx
from tusk.router.discovery import DiscoveredWorker, KubernetesDiscovery, pod_endpoints

from tusk.config import Role, RoutingConfig

LABELS = {
    "app.kubernetes.io/part-of": "tusk",
    "app.kubernetes.io/name": "tusk-worker",
    "app.kubernetes.io/instance": "llama",
    "app.kubernetes.io/managed-by": "tusk-operator",
    "tusk.dev/model": "llama",
    "tusk.dev/role": "decode",
}


def pod(
    name="p1", ip="10.0.0.7", port=50051, ready=True, phase="Running", labels=None, names=None, deleting=False
):
    meta = {"name": name, "namespace": "ml", "labels": dict(LABELS if labels is None else labels)}
    if names:
        meta["annotations"] = {"tusk.dev/served-model-names": names}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "ports": [
                        {"name": "metrics", "containerPort": 9090},
                        {"name": "grpc", "containerPort": port},
                    ],
                }
            ]
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_pod_endpoints_follow_the_label_contract() -> None:
    assert pod_endpoints(pod()) == [DiscoveredWorker("llama", "10.0.0.7:50051", Role.DECODE)]
    assert pod_endpoints(pod(names="llama-8b, chat")) == [
        DiscoveredWorker("llama-8b", "10.0.0.7:50051", Role.DECODE),
        DiscoveredWorker("chat", "10.0.0.7:50051", Role.DECODE),
    ]
    assert pod_endpoints(pod(ip="fd00::5", port=7000))[0].address == "[fd00::5]:7000"
    assert pod_endpoints(pod(ready=False)) == []
    assert pod_endpoints(pod(phase="Pending")) == []
    assert pod_endpoints(pod(deleting=True)) == []
    assert pod_endpoints(pod(ip=None)) == []
    assert pod_endpoints(pod(labels={**LABELS, "app.kubernetes.io/name": "other"})) == []
    assert pod_endpoints(pod(labels={**LABELS, "tusk.dev/role": "weird"})) == []


def test_pod_endpoints_accept_kubernetes_client_objects() -> None:
    import json

    from kubernetes.client import ApiClient

    obj = ApiClient().deserialize(json.dumps(pod()), "V1Pod", "application/json")
    assert pod_endpoints(obj) == [DiscoveredWorker("llama", "10.0.0.7:50051", Role.DECODE)]


def test_watch_events_add_and_remove_workers_live(harness) -> None:
    """A model that exists only in the cluster: its first pod brings the tokenizer via
    GetModelInfo, later pods join, deleted pods leave, all while the router serves."""
    w1, e1 = harness.worker(model="llama", tokenizer_dir=harness.tokenizer_dir)
    w2, e2 = harness.worker(model="llama", tokenizer_dir=harness.tokenizer_dir)
    router, url = harness.router([e1], wait_ready=True)  # also serves the static "tiny" model
    disc = KubernetesDiscovery(router.registry, router.metrics, RoutingConfig(policy="round_robin"))

    def event(kind, p):
        async def apply():
            disc.on_event(kind, p)

        harness.run(apply())

    def wait(pred, what):
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    host1, port1 = e1.address.split(":")
    host2, port2 = e2.address.split(":")
    event("ADDED", pod("a", ip=host1, port=int(port1)))
    wait(lambda: "llama" in router.registry.models, "model never discovered")
    wait(lambda: router.registry.get("llama").has_ready_worker(), "worker never ready")
    body = {"model": "llama", "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
    assert "llama" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]

    event("ADDED", pod("b", ip=host2, port=int(port2), ready=False))
    assert len(router.registry.get("llama").clients) == 1  # not ready: not routed to
    event("MODIFIED", pod("b", ip=host2, port=int(port2)))
    wait(lambda: len(router.registry.get("llama").ready_states()) == 2, "second pod never joined")
    event("DELETED", pod("a", ip=host1, port=int(port1)))
    wait(lambda: len(router.registry.get("llama").clients) == 1, "deleted pod never left")
    before = len(w2.s.generate_calls)
    for _ in range(2):
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
    assert len(w2.s.generate_calls) == before + 2
    event("DELETED", pod("b", ip=host2, port=int(port2)))
    wait(lambda: not router.registry.get("llama").clients, "last pod never left")
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 503


def test_watch_loop_against_an_emulated_api_server(harness) -> None:
    """The real watch thread and kubernetes client against kmock's API server emulator."""
    import contextlib

    import kmock
    from kubernetes import client as k8s

    stack = contextlib.AsyncExitStack()

    async def start_emulator() -> str:
        emulator = await stack.enter_async_context(kmock.KubernetesEmulator())
        server = await stack.enter_async_context(kmock.Server(emulator))
        emulator.resources.load_bundled()
        return str(server.url).rstrip("/")

    api_url = harness.run(start_emulator())

    def api() -> k8s.CoreV1Api:
        return k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=api_url)))

    _, endpoint = harness.worker(model="llama", tokenizer_dir=harness.tokenizer_dir)
    router, url = harness.router([], wait_ready=False)
    disc = KubernetesDiscovery(
        router.registry,
        router.metrics,
        RoutingConfig(policy="round_robin"),
        api_factory=api,
        watch_timeout_s=1,
    )
    harness.run(disc.start())
    try:
        host, port = endpoint.address.split(":")
        api().create_namespaced_pod("ml", pod("w-1", ip=host, port=int(port)))
        deadline = time.monotonic() + 15
        while not ("llama" in router.registry.models and router.registry.get("llama").has_ready_worker()):
            assert time.monotonic() < deadline, "watched pod never became a worker"
            time.sleep(0.05)
        assert (
            httpx.post(
                f"{url}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2}
            ).status_code
            == 200
        )
        api().delete_namespaced_pod("w-1", "ml")
        while router.registry.get("llama").clients:
            assert time.monotonic() < deadline + 10, "deleted pod never left"
            time.sleep(0.05)
    finally:
        harness.run(disc.stop(), timeout=30)
        harness.run(stack.aclose())


def test_a_route_selector_claims_pods_without_the_tusk_labels() -> None:
    plain = pod(labels={"app": "my-vllm-compatible-worker", "tusk.dev/role": "both"})
    assert pod_endpoints(plain) == []
    assert pod_endpoints(plain, model="mine") == [DiscoveredWorker("mine", "10.0.0.7:50051", Role.BOTH)]
    assert pod_endpoints(pod(ready=False), model="mine") == []


def test_a_departing_pod_finishes_its_streams(harness) -> None:
    """A terminating pod leaves the routing set at once, but its running stream completes."""
    import threading

    slow, endpoint = harness.worker(
        model="llama",
        tokenizer_dir=harness.tokenizer_dir,
        token_delay_s=0.02,
        script=harness.script("word " * 100),
    )
    router, url = harness.router([], wait_ready=False)
    disc = KubernetesDiscovery(router.registry, router.metrics, RoutingConfig(policy="round_robin"))
    host, port = endpoint.address.split(":")

    def event(kind, p):
        async def apply():
            disc.on_event(kind, p)

        harness.run(apply())

    event("ADDED", pod("a", ip=host, port=int(port)))
    deadline = time.monotonic() + 10
    while not ("llama" in router.registry.models and router.registry.get("llama").has_ready_worker()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines: list[str] = []

    def stream() -> None:
        body = {"model": "llama", "prompt": "x", "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=20) as r:
            lines.extend(ln for ln in r.iter_lines() if ln)

    t = threading.Thread(target=stream)
    t.start()
    while not slow.s.generate_calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    event("MODIFIED", pod("a", ip=host, port=int(port), deleting=True))
    while router.registry.get("llama").clients:  # no new requests go there
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert t.is_alive()  # ...while the running stream goes on
    t.join(20)
    assert lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)


def test_a_failed_tokenizer_fetch_is_retried_on_the_next_event(harness) -> None:
    worker, endpoint = harness.worker(model="late", tokenizer_dir=None)  # GetModelInfo has no files
    router, _ = harness.router([], wait_ready=False)
    disc = KubernetesDiscovery(router.registry, router.metrics, RoutingConfig(policy="round_robin"))
    host, port = endpoint.address.split(":")
    p = pod("a", ip=host, port=int(port), names="late")

    def event(kind):
        async def apply():
            disc.on_event(kind, p)

        harness.run(apply())

    event("ADDED")
    deadline = time.monotonic() + 10
    while disc._pending:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "late" not in router.registry.models  # no tokenizer, no model
    worker.s.tokenizer_dir = harness.tokenizer_dir
    event("MODIFIED")
    while "late" not in router.registry.models:
        assert time.monotonic() < deadline, "the fetch was never retried"
        time.sleep(0.02)
