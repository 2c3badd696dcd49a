"""Kubernetes discovery pieces: pods -> endpoints as a pure function, the owner chain, the
list/watch plumbing against kmock's API server emulator with the real ``kubernetes`` client,
route selectors, departing pods, and a model whose tokenizer cannot be fetched yet."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from router_fake_cluster import FakeCluster, FakeListWatch, owner_ref
from test_discovery_watch import Setup, pod, wait
from tusk.router import discovery as discovery_module
from tusk.router.discovery import OwnerChain, SelectorDiscovery, pod_endpoint
from tusk.router.kube import SYNC, ClientListWatch, Reflector, _is_gone

from tusk.config import Role


def test_pod_endpoint_needs_a_running_ready_pod_with_an_ip() -> None:
    base = pod("ml", "p", "10.0.0.7:50051", None)
    assert pod_endpoint(base) == ("10.0.0.7:50051", Role.DECODE)
    assert pod_endpoint(pod("ml", "p", "fd00::5:7000", None)) == ("[fd00::5]:7000", Role.DECODE)
    assert pod_endpoint(pod("ml", "p", "10.0.0.7:50051", None, ready=False)) is None
    assert pod_endpoint(pod("ml", "p", "10.0.0.7:50051", None, role="weird")) is None
    for change in ({"phase": "Pending"}, {"podIP": None}):
        p = pod("ml", "p", "10.0.0.7:50051", None)
        p["status"].update(change)
        assert pod_endpoint(p) is None
    p = pod("ml", "p", "10.0.0.7:50051", None)
    p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_endpoint(p) is None


def test_owner_chain_checks_uids_kinds_and_caches() -> None:
    cluster = FakeCluster()
    md = cluster.model_deployment("ml", "llama")
    rs = cluster.replica_set_of(md)
    gets: list[tuple[str, str, str]] = []

    def get(kind, ns, name):
        gets.append((kind, ns, name))
        return cluster.get(kind, ns, name)

    chain = OwnerChain(get)
    good = pod("ml", "p", "10.0.0.1:1", rs)
    assert chain.model_deployment(good) == ("llama", md["metadata"]["uid"])
    assert chain.model_deployment(good) == ("llama", md["metadata"]["uid"])
    assert len(gets) == 2  # ReplicaSet and Deployment once each
    assert chain.model_deployment(pod("ml", "p", "10.0.0.1:1", None)) is None
    assert chain.model_deployment(pod("other", "p", "10.0.0.1:1", rs)) is None  # same names elsewhere: no
    forged = {**rs, "metadata": {**rs["metadata"], "uid": "guess"}}
    assert chain.model_deployment(pod("ml", "p", "10.0.0.1:1", forged)) is None
    as_deployment = {**rs, "kind": "Deployment"}  # skips the ReplicaSet step
    assert chain.model_deployment(pod("ml", "p", "10.0.0.1:1", as_deployment)) is None


def test_gone_covers_410_and_too_large_resource_versions() -> None:
    assert _is_gone(410, "Gone: too old resource version: 5 (10)")
    assert _is_gone(504, "Timeout: Too large resource version: 12, current: 9")
    assert not _is_gone(504, "Timeout: request did not complete")
    assert not _is_gone(403, "Forbidden")


def test_client_list_watch_against_an_emulated_api_server(harness) -> None:
    """The real kubernetes client: list gives the items and a resourceVersion, the watch
    delivers what follows in order, and stop wakes a watch parked in its long poll at once."""
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
    core = k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=api_url)))
    core.create_namespaced_pod("ml", pod("ml", "before", "10.0.0.1:1", None))
    events: list[tuple[str, str]] = []
    source = ClientListWatch(
        core.list_namespaced_pod, "ml", label_selector="app.kubernetes.io/name=tusk-worker"
    )

    def deliver(kind, payload):
        if kind == SYNC:
            events.append((SYNC, ",".join(sorted(p["metadata"]["name"] for p in payload))))
        else:
            events.append((kind, payload["metadata"]["name"]))

    reflector = Reflector("pods", source, deliver, watch_timeout_s=300)
    reflector.start()
    try:
        wait(lambda: events, "no list")
        assert events[0] == (SYNC, "before")
        time.sleep(0.3)  # the watch is open now (kmock replays "before" as ADDED: harmless)
        core.create_namespaced_pod("ml", pod("ml", "after", "10.0.0.2:1", None))
        core.delete_namespaced_pod("before", "ml")
        wait(lambda: events[-1:] == [("DELETED", "before")], "no watch events")
        assert events[-2:] == [("ADDED", "after"), ("DELETED", "before")]
        assert reflector.lists == 1
    finally:
        started = time.monotonic()
        reflector.stop(10)
        assert time.monotonic() - started < 5  # not the 300 s watch timeout
        harness.run(stack.aclose())


def test_a_route_selector_claims_its_pods_in_order(harness) -> None:
    cluster = FakeCluster()
    _, endpoint = harness.worker()
    router, url = harness.router([], wait_ready=False)  # serves the static "tiny" model
    disc = SelectorDiscovery(
        router.registry, "tiny", selector="app=mine", source=FakeListWatch(cluster, "pods")
    )
    harness.run(disc.start())
    try:
        plain = pod("ml", "mine", endpoint.address, None, labels={"app": "mine"}, role="both")
        cluster.put("pods", plain)
        wait(lambda: router.registry.get("tiny").can_serve(), "selected pod never served")
        for ready in (False, True, False, True):
            cluster.put("pods", pod("ml", "mine", endpoint.address, None, role="both", ready=ready))
        time.sleep(0.3)
        assert set(router.registry.get("tiny").clients) == {endpoint.address}
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 200
        cluster.delete("pods", "ml", "mine")
        wait(lambda: not router.registry.get("tiny").clients, "deleted pod stayed")
    finally:
        harness.run(disc.stop())


@pytest.fixture
def one_model(harness):
    made: list[Setup] = []
    yield made
    for s in made:
        s.close()


def test_a_departing_pod_finishes_its_streams(harness, one_model) -> None:
    """A terminating pod leaves the routing set at once, but its running stream completes."""
    s = Setup(harness)
    one_model.append(s)
    slow, address = s.worker(token_delay_s=0.02, script=harness.script("word " * 100))
    md = s.cluster.model_deployment("ml", "llama")
    rs = s.cluster.replica_set_of(md)
    s.cluster.put("pods", pod("ml", "a", address, rs))
    s.settle({("ml/llama", address)}, "start")
    lines: list[str] = []

    def stream() -> None:
        body = {"model": "llama", "prompt": "x", "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=20) as r:
            lines.extend(ln for ln in r.iter_lines() if ln)

    t = threading.Thread(target=stream)
    t.start()
    wait(lambda: slow.s.generate_calls, "stream never started")
    terminating = pod("ml", "a", address, rs)
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    s.cluster.put("pods", terminating)
    s.settle(set(), "terminating pod still routed")
    assert t.is_alive()  # ...while the running stream goes on
    t.join(20)
    assert lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)


def test_a_model_whose_tokenizer_cannot_be_fetched_yet_is_retried(harness, one_model, monkeypatch) -> None:
    monkeypatch.setattr(discovery_module, "RETRY_MODEL_S", 0.2)
    s = Setup(harness)
    one_model.append(s)
    worker, endpoint = harness.worker(model="late", tokenizer_dir=None)  # GetModelInfo has no files
    md = s.cluster.model_deployment("ml", "late")
    s.cluster.put("pods", pod("ml", "a", endpoint.address, s.cluster.replica_set_of(md)))
    time.sleep(0.5)
    assert "ml/late" not in s.router.registry.models  # no tokenizer, no model
    worker.s.tokenizer_dir = harness.tokenizer_dir
    s.settle({("ml/late", endpoint.address)}, "the fetch was never retried")


def test_owner_ref_helper_matches_what_the_operator_writes() -> None:
    from tusk.operator.desired import Owner

    cluster = FakeCluster()
    md = cluster.model_deployment("ml", "llama")
    ours = owner_ref(md)
    theirs = Owner(name="llama", namespace="ml", uid=md["metadata"]["uid"]).reference()
    assert {k: theirs[k] for k in ours} == ours


class _ScriptedSource:
    """Each watch() plays the next script entry: an exception to raise or events to yield."""

    def __init__(self, script) -> None:
        self.script = list(script)
        self.lists = 0
        self.watched_from: list[str] = []
        self.parked = threading.Event()
        self.cancelled = threading.Event()

    def list(self):
        self.lists += 1
        return [{"metadata": {"name": f"list-{self.lists}"}}], f"{self.lists * 100}"

    def watch(self, resource_version, timeout_s):
        self.watched_from.append(resource_version)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        yield from step or []
        if not self.script:
            self.parked.set()
            self.cancelled.wait(30)

    def cancel(self) -> None:
        self.cancelled.set()


def _event(kind: str, name: str, version: int) -> dict:
    return {"type": kind, "object": {"metadata": {"name": name, "resourceVersion": str(version)}}}


def test_reflector_relists_after_gone_and_too_large_and_resumes_otherwise() -> None:
    from tusk.router.kube import Gone

    source = _ScriptedSource(
        [
            [_event("ADDED", "a", 101)],  # then the server ends the watch: resume from 101
            [{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "150"}}}],
            [{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}],
            Gone("504 Timeout: Too large resource version"),
            [_event("DELETED", "a", 301)],
        ]
    )
    seen: list[tuple[str, str]] = []

    def deliver(kind, payload):
        seen.append((kind, payload[0]["metadata"]["name"] if kind == SYNC else payload["metadata"]["name"]))

    reflector = Reflector("x", source, deliver, min_backoff_s=0.01)
    reflector.start()
    try:
        assert source.parked.wait(10)
        assert seen == [
            (SYNC, "list-1"),
            ("ADDED", "a"),
            (SYNC, "list-2"),
            (SYNC, "list-3"),
            ("DELETED", "a"),
        ]
        assert source.watched_from == ["100", "101", "150", "200", "300"]
    finally:
        started = time.monotonic()
        reflector.stop(5)
        assert time.monotonic() - started < 3
