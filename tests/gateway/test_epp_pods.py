"""``tusk epp`` in a cluster: a route's ``kubernetes_selector`` makes its servers the ready pods it
matches (the operator's InferencePool selector), on their ``http`` container port; pods that
leave or turn unready stop being picked at once."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from pathlib import Path

import pytest
from fake_openai import FakeBackend
from tusk.operator import inference_pool
from tusk.operator.desired import HTTP_PORT, Owner
from tusk.router.epp.picker import EndpointPicker, PickError
from tusk.router.epp.pods import PodServers, pod_http_address, pod_server

from tusk.config import EndpointPickerConfig, ModelRoute, RoutingConfig

_spec = importlib.util.spec_from_file_location(
    "epp_router_fake_cluster", Path(__file__).parents[1] / "router" / "router_fake_cluster.py"
)
_fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fake)

SELECTOR = inference_pool.pool_selector(Owner("chat", "models", "u"))
SELECTOR_TEXT = ",".join(f"{k}={v}" for k, v in sorted(SELECTOR.items()))
BODY = json.dumps({"model": "tiny", "prompt": "hello there", "max_tokens": 2}).encode()


def _pod(name: str, address: str, *, ready: bool = True, role: str = "both", events: bool = False) -> dict:
    ip, _, port = address.rpartition(":")
    kv = [{"name": "kv-events", "containerPort": 5557}, {"name": "kv-replay", "containerPort": 5558}]
    return {
        "metadata": {"name": name, "namespace": "models", "labels": {**SELECTOR, "tusk.dev/role": role}},
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "ports": [
                        {"name": "grpc", "containerPort": 50051},
                        {"name": "http", "containerPort": int(port)},
                        *(kv if events else []),
                    ],
                }
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_pod_http_address_uses_the_http_port_of_ready_serving_pods() -> None:
    assert pod_http_address(_pod("a", "10.0.0.7:8123")) == "10.0.0.7:8123"
    assert pod_http_address(_pod("a", "10.0.0.7:8123", ready=False)) is None
    assert pod_http_address(_pod("a", "10.0.0.7:8123", role="prefill")) is None
    bare = _pod("a", "10.0.0.7:1")
    bare["spec"]["containers"][0]["ports"] = []
    assert pod_http_address(bare) == f"10.0.0.7:{HTTP_PORT}"  # the operator's port when unnamed
    six = _pod("a", "fd00::5:8000")
    assert pod_http_address(six) == "[fd00::5]:8000"
    # An operator vLLM worker names its ZMQ KV event ports: the picker's index follows its events.
    server = pod_server(_pod("a", "10.0.0.7:8000", events=True))
    assert (server.kv_events, server.kv_events_replay) == ("tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558")
    assert pod_server(_pod("a", "10.0.0.7:8000")).kv_events is None


async def _until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def test_servers_follow_the_selected_pods(tiny_model: Path) -> None:
    backends = [FakeBackend() for _ in range(2)]
    a, b = [await backend.start() for backend in backends]
    route = ModelRoute(
        name="tiny", tokenizer=str(tiny_model), block_size=4, kubernetes_selector=SELECTOR_TEXT
    )
    config = EndpointPickerConfig(
        port=0, models=[route], routing=RoutingConfig(policy="cost", kv_events=False), poll_interval_s=0.1
    )
    picker = EndpointPicker(config)
    picker.start()
    cluster = _fake.FakeCluster()
    cluster.put("pods", _pod("a", a, events=True))
    watch = PodServers(picker.models["tiny"], SELECTOR_TEXT, source=_fake.FakeListWatch(cluster, "pods"))
    await watch.start()
    model = picker.models["tiny"]

    async def picked() -> list[str]:
        await model.pool.scrape_all()
        pick = await picker.pick({}, BODY, None)
        pick.release()
        return pick.endpoints

    try:
        await _until(lambda: model.pool.backends.get(a), "the listed pod became a server")
        assert model.pool.backends[a].exact_events
        assert [s.feed.worker_id for s in model.routes.subscribers] == [a]
        assert await picked() == [a]
        cluster.put("pods", _pod("b", b))
        cluster.put("pods", _pod("a", a, ready=False))
        cluster.put("pods", _pod("p", "127.0.0.1:1", role="prefill"))
        await _until(lambda: set(model.pool.backends) == {b}, "unready pod left, new pod joined")
        assert model.routes.subscribers == []  # the departed pod's event feed is closed
        assert await picked() == [b]
        cluster.delete("pods", "models", "b")
        await _until(lambda: not model.pool.backends, "deleted pod left")
        with pytest.raises(PickError) as refused:
            await picker.pick({}, BODY, None)
        assert refused.value.status == 503
    finally:
        await watch.stop()
        await picker.close()
        for backend in backends:
            await backend.stop()
