"""``tusk router`` in front of OpenAI HTTP servers (vLLM, SGLang): pass-through, failover,
and routing by the servers' ZMQ KV events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import msgspec
import openai
import zmq
import zmq.asyncio
from fake_openai import FakeBackend
from tusk.router.app import Router, RouterOptions, _bind, build_server
from tusk.router.http_backend import prompt_token_ids
from tusk.router.tokenizer import ModelTokenizer

from tusk.config import ModelRoute, RouterConfig, RoutingConfig, WorkerEndpoint


class Stored(msgspec.Struct, tag="BlockStored", array_like=True):  # SGLang / older vLLM shape
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


async def _serve(config: RouterConfig) -> tuple[Router, str, asyncio.Task, object]:
    router = Router(config, RouterOptions(poll_interval_s=0.1))
    sock = _bind("127.0.0.1", 0)
    server = build_server(router, drain_timeout=1)
    await router.start()
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return router, f"http://127.0.0.1:{sock.getsockname()[1]}", task, server


async def _ready(router: Router) -> None:
    runtime = router.registry.get("tiny")
    for _ in range(300):
        if runtime.http is not None and all(b.state.healthy for b in runtime.http.pool.backends.values()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("backends never became healthy")


async def test_router_proxies_to_openai_servers_and_routes_by_their_kv_events(tiny_model: Path) -> None:
    backends = [FakeBackend(), FakeBackend()]
    addresses = [await b.start() for b in backends]
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    events = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    route = ModelRoute(
        name="tiny",
        tokenizer=str(tiny_model),
        block_size=4,
        workers=[
            WorkerEndpoint(address=addresses[0], protocol="http"),
            WorkerEndpoint(address=addresses[1], protocol="http", kv_events=events),
        ],
    )
    router, url, task, server = await _serve(
        RouterConfig(port=0, models=[route], routing=RoutingConfig(policy="cost"))
    )
    try:
        await _ready(router)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "a long shared system prompt " * 20}]
        reply = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
        assert reply.choices[0].message.content == " ok" * 8  # the server's bytes, untouched
        stream = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == " ok" * 8
        done = await client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert done.choices[0].text == " ok" * 8

        # Backend 1 reports (over ZMQ, in vLLM's format) that it caches a new conversation's
        # prefix: the router sends that conversation there.
        other = [{"role": "user", "content": "an unrelated conversation about walruses " * 20}]
        ids = await prompt_token_ids(ModelTokenizer.from_dir(tiny_model), {"messages": other})
        full = len(ids) - len(ids) % 4
        payload = msgspec.msgpack.encode(
            [1.0, [Stored(list(range(1, full // 4 + 1)), None, ids[:full], 4, None, "GPU")], 0]
        )
        index = router.registry.get("tiny").index
        for seq in range(1000):  # PUB drops until the subscription is live (generous: busy CI)
            await pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            await asyncio.sleep(0.02)
            if index.worker_blocks(addresses[1]) >= full // 4:
                break
        async with httpx.AsyncClient(timeout=10) as http:
            metrics = (await http.get(f"{url}/metrics")).text
        stored = f'tusk_router_engine_kv_events_total{{model="tiny",outcome="stored_blocks",worker="{addresses[1]}"}}'
        assert stored in metrics
        before = len(backends[1].served)
        for _ in range(3):
            await client.chat.completions.create(model="tiny", messages=other, max_tokens=4)
        assert len(backends[1].served) == before + 3
        assert json.loads(backends[1].served[-1])["messages"] == other

        # A server that went away: requests fail over before the first byte.
        await backends[1].stop()
        reply = await client.chat.completions.create(model="tiny", messages=other, max_tokens=4)
        assert reply.choices[0].message.content == " ok" * 8
        async with httpx.AsyncClient(timeout=10) as http:
            bad = await http.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": messages})
            assert bad.status_code == 404
        assert router.api.inflight == 0
    finally:
        server.should_exit = True
        await task
        await router.stop()
        pub.close(0)
        ctx.term()
        for b in backends:
            await b.stop()


def test_parse_load_reads_vllm_and_sglang_names() -> None:
    from tusk.router.http_backend import parse_load

    vllm = (
        '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="a"} 3\n'
        'vllm:num_requests_waiting{model_name="b"} 2\n'
        '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="a"} 4\n'
        '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="a"} 0.25\n'
        '# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size="32",num_gpu_blocks="800"} 1\n'
    )
    sample = parse_load(vllm)
    assert (sample.waiting, sample.running, sample.kv_usage) == (5, 4, 0.25)
    assert (sample.block_size, sample.num_blocks) == (32, 800)
    sglang = "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 7\nsglang:token_usage 0.5\n"
    sample = parse_load(sglang)
    assert (sample.waiting, sample.running, sample.kv_usage, sample.num_blocks) == (7, 0, 0.5, None)
