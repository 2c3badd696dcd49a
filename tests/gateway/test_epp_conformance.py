"""``tusk epp`` against the endpoint-picker conformance kit, over mock OpenAI servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from epp_conformance import BUFFERED, Exchange, assert_immediate, assert_routed, served_metadata
from fake_openai import FakeBackend
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tusk.router.epp.main import EndpointPickerServer

from tusk.config import EndpointPickerConfig, ModelRoute, RoutingConfig, WorkerEndpoint

CHAT = json.dumps(
    {"model": "tiny", "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 4}
).encode()


@pytest.fixture
async def cluster(tiny_model: Path) -> AsyncIterator[tuple[EndpointPickerServer, list[FakeBackend]]]:
    backends = [FakeBackend() for _ in range(3)]
    addresses = [await b.start() for b in backends]
    config = EndpointPickerConfig(
        port=0,
        models=[
            ModelRoute(
                name="tiny",
                tokenizer=str(tiny_model),
                block_size=4,
                workers=[WorkerEndpoint(address=a, protocol="http") for a in addresses],
            )
        ],
        routing=RoutingConfig(policy="cost", kv_events=False),
        fallbacks=2,
        shed_queue_depth=50,
        poll_interval_s=0.1,
        metrics_port=0,
    )
    server = EndpointPickerServer(config)
    await server.start()
    await server.wait_ready()
    try:
        yield server, backends
    finally:
        await server.stop(grace=0)
        for b in backends:
            await b.stop()


async def _scraped(server: EndpointPickerServer) -> None:
    """Wait for two full scrapes, so the picker sees what the backends report now."""
    for _ in range(2):
        await asyncio.sleep(0.25)
        for model in server.picker.models.values():
            await model.pool.scrape_all()


async def test_routes_with_header_equal_to_metadata_and_echoes_the_body(cluster) -> None:
    server, backends = cluster
    allowed = {b.address for b in backends}
    result = await Exchange(server.address).run(CHAT, chunks=3)
    endpoints = assert_routed(result, allowed)
    assert len(endpoints) == 3  # primary + 2 fallbacks
    assert result.echoed_body == (CHAT, True)
    # The same prompt again goes where its prefix is cached (approximate index), as in the router.
    again = await Exchange(server.address).run(CHAT)
    assert assert_routed(again, allowed)[0] == endpoints[0]
    # BUFFERED body mode: the pick rides on the body answer.
    buffered = await Exchange(server.address).run(CHAT, mode=BUFFERED)
    assert_routed(buffered, allowed)
    # No body (GET /v1/models): routed by load alone.
    get = await Exchange(server.address).run(None, path="/v1/models")
    assert_routed(get, allowed)


async def test_fallbacks_are_ordered_by_load(cluster) -> None:
    server, backends = cluster
    backends[0].waiting, backends[1].waiting, backends[2].waiting = 9, 1, 5
    await _scraped(server)
    result = await Exchange(server.address).run(CHAT)
    endpoints = assert_routed(result, {b.address for b in backends})
    assert endpoints[0] == backends[1].address  # the policy avoids queues
    load = {b.address: b.waiting for b in backends}
    assert endpoints[1:] == sorted(endpoints[1:], key=load.__getitem__) and len(endpoints) == 3


async def test_subset_hint_is_honoured(cluster) -> None:
    server, backends = cluster
    allowed = {b.address for b in backends}
    for subset in ([backends[2].address], [backends[0].address, backends[1].address]):
        for _ in range(3):
            result = await Exchange(server.address).run(CHAT, subset=subset)
            assert set(assert_routed(result, allowed)) <= set(subset)
    assert_immediate(await Exchange(server.address).run(CHAT, subset=[]), 503)
    assert_immediate(await Exchange(server.address).run(CHAT, subset=["10.255.255.1:9"]), 503)


async def test_503_without_ready_endpoints_and_429_to_shed(cluster) -> None:
    server, backends = cluster
    for b in backends:
        b.waiting = 80
    await _scraped(server)
    result = await Exchange(server.address).run(CHAT)
    assert_immediate(result, 429)
    assert result.immediate_body["error"]["code"] == "overloaded"
    for b in backends:
        await b.stop()
    await _scraped(server)
    assert_immediate(await Exchange(server.address).run(CHAT), 503)


async def test_bad_input_gets_an_immediate_response(cluster) -> None:
    server, backends = cluster
    exchange = Exchange(server.address)
    assert_immediate(await exchange.run(b"{not json", chunks=2), 400)
    assert_immediate(await exchange.run(b"[1, 2]"), 400)
    unknown = await exchange.run(json.dumps({"model": "nope", "prompt": "x"}).encode())
    assert_immediate(unknown, 404)
    assert unknown.immediate_body["error"]["code"] == "model_not_found"
    body_first = [ext.ProcessingRequest(request_body=ext.HttpBody(body=CHAT, end_of_stream=True))]
    assert_immediate(await exchange.run(None, raw_messages=body_first), 400)
    response_first = [ext.ProcessingRequest(response_headers=ext.HttpHeaders())]
    assert_immediate(await exchange.run(None, raw_messages=response_first), 400)


async def test_served_endpoint_is_read_back(cluster) -> None:
    server, backends = cluster
    model = server.picker.models["tiny"]
    result = await Exchange(server.address).run(CHAT)
    primary, fallback = assert_routed(result, {b.address for b in backends})[:2]
    # The data plane fell back to the second endpoint: the picker charges and indexes that one.
    before = model.fallbacks_served
    retried = await Exchange(server.address).run(CHAT, served=fallback)
    assert assert_routed(retried, {b.address for b in backends})[0] == primary
    assert model.fallbacks_served == before + 1
    assert all(b.state.inflight == 0 for b in model.pool.backends.values())
    assert (
        served_metadata(fallback).filter_metadata["envoy.lb"].fields["x-gateway-destination-endpoint-served"]
    )


async def test_health_services(cluster) -> None:
    server, _ = cluster
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    await Exchange(server.address).run(b"{not json")
    async with httpx.AsyncClient(timeout=10) as http:
        metrics = (await http.get(f"http://127.0.0.1:{server.metrics_port}/metrics")).text
    assert 'tusk_epp_picks_total{status="400"} 1.0' in metrics
