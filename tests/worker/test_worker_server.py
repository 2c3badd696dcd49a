"""The gRPC worker over real loopback: streaming, prefill/decode split, errors, cancel, events, drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from tusk.worker.server import Worker
from worker_models import hf_greedy

from tusk.config import EngineConfig, KVTierConfig, Role, WorkerConfig
from tusk.hashing import block_hashes
from tusk.protocol import pb, rpc

PROMPT = [(i * 37 + 11) % 250 + 3 for i in range(27)]


def worker_config(model: Path, role: Role = Role.BOTH, tier: str | None = None, **extra) -> WorkerConfig:
    return WorkerConfig(
        model=str(model),
        role=role,
        worker_id=f"w-{role.value}",
        engine=EngineConfig(num_kv_blocks=64, block_size=4),
        kv_tier=KVTierConfig(url=tier, host_cache_blocks=0),
        **extra,
    )


async def start(config: WorkerConfig) -> tuple[Worker, rpc.WorkerStub, grpc.aio.Channel]:
    worker = Worker(config)
    address = await worker.start()
    channel = grpc.aio.insecure_channel(address)
    return worker, rpc.WorkerStub(channel), channel


def greedy(n: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, ignore_eos=True)


async def collect(stream) -> tuple[list[int], list[pb.GenerateResponse]]:
    """Read a Generate stream to its end (with read(), so it may follow earlier reads)."""
    messages = []
    while (message := await stream.read()) != grpc.aio.EOF:
        messages.append(message)
    return [t for m in messages for t in m.token_ids], messages


async def test_generate_stream_health_load_and_model_info(llama_dir: Path, unused_port: int) -> None:
    worker, stub, channel = await start(worker_config(llama_dir, metrics_port=unused_port))
    try:
        tokens, messages = await collect(
            stub.Generate(pb.GenerateRequest(request_id="a", prompt_token_ids=PROMPT, sampling=greedy(8)))
        )
        assert tokens == hf_greedy(llama_dir, PROMPT, 8)
        assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert messages[0].prompt_tokens == 27 and messages[0].cached_tokens == 0
        # Same prompt again: every full block but the last is reused.
        tokens2, messages2 = await collect(
            stub.Generate(pb.GenerateRequest(request_id="b", prompt_token_ids=PROMPT, sampling=greedy(8)))
        )
        assert tokens2 == tokens and messages2[0].cached_tokens == 24

        health = await stub.Health(pb.HealthRequest())
        assert health.status == pb.HealthResponse.STATUS_SERVING
        assert (health.role, health.block_size, health.vocab_size, health.max_model_len) == (
            "both",
            4,
            256,
            512,
        )
        assert health.kv_fingerprint == worker.service.engine.fingerprint.digest() and health.model == "llama"

        load = await stub.GetLoad(pb.LoadRequest())
        assert load.total_blocks == 64 and load.running_requests == 0 and load.cache_hit_tokens == 24
        assert load.cache_query_tokens == 54 and load.prefill_tokens_per_s > 0 and load.decode_step_s > 0

        info = await stub.GetModelInfo(pb.ModelInfoRequest())
        assert info.eos_token_ids == [2] and "generation_config.json" in info.files

        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics").read().decode()
        )
        assert 'tusk_worker_generated_tokens_total{model="llama",role="both",worker_id="w-both"} 16.0' in body
        assert "tusk_worker_kv_free_blocks" in body and "tusk_worker_step_seconds_bucket" in body
        assert (
            'tusk_worker_time_to_first_token_seconds_count{model="llama",role="both",worker_id="w-both"} 2.0'
            in body
        )
        assert "tusk_kernel" in body  # process-wide metrics (kernels, KV tier) are served too
    finally:
        await channel.close()
        await worker.stop(drain_timeout=0)


async def test_prefill_and_decode_on_two_servers_through_the_tier(llama_dir: Path, kv_server) -> None:
    prefill, p_stub, p_chan = await start(worker_config(llama_dir, Role.PREFILL, kv_server.url))
    decode, d_stub, d_chan = await start(worker_config(llama_dir, Role.DECODE, kv_server.url))
    try:
        sp = greedy(9)
        events = p_stub.StreamKvEvents(pb.KvEventsRequest())
        await events.read()  # the snapshot
        first = await p_stub.Prefill(pb.PrefillRequest(request_id="r", prompt_token_ids=PROMPT, sampling=sp))
        assert list(first.block_hashes) == block_hashes(PROMPT, 4)
        assert first.blocks_in_tier == 6 and first.computed_tokens == 27
        assert first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
        rest, messages = await collect(
            d_stub.Generate(
                pb.GenerateRequest(
                    request_id="r", prompt_token_ids=PROMPT, sampling=sp, first_token=first.first_token
                )
            )
        )
        assert [first.first_token, *rest] == hf_greedy(llama_dir, PROMPT, 9)
        assert messages[0].cached_tokens == 24  # all six full blocks came from the tier

        # The prefill worker announced the blocks on its device and in the tier.
        seen: dict[int, set[int]] = {pb.KV_MEDIUM_DEVICE: set(), pb.KV_MEDIUM_TIER: set()}
        while not all(len(v) == 6 for v in seen.values()):
            batch = await asyncio.wait_for(events.read(), 5)
            for event in batch.events:
                if event.kind == pb.KvEvent.KIND_STORED and event.medium in seen:
                    seen[event.medium].update(event.block_hashes)
        assert seen[pb.KV_MEDIUM_TIER] == set(first.block_hashes)
        events.cancel()
    finally:
        await p_chan.close()
        await d_chan.close()
        await prefill.stop(drain_timeout=0)
        await decode.stop(drain_timeout=0)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "first_token", "words"),
    [
        ([], 4, None, "empty"),
        ([5] * 600, 4, None, "context"),
        ([5, 256], 4, None, "vocabulary"),
        ([5, 6], 4, 999, "vocabulary"),
        ([5, 6], 0, None, "max_tokens"),
    ],
)
async def test_bad_input_is_invalid_argument(
    llama_dir: Path, prompt: list[int], max_tokens: int, first_token: int | None, words: str
) -> None:
    worker, stub, channel = await start(worker_config(llama_dir))
    try:
        request = pb.GenerateRequest(
            prompt_token_ids=prompt, sampling=greedy(max_tokens), first_token=first_token
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub.Generate(request))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        if first_token is None:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Prefill(pb.PrefillRequest(prompt_token_ids=prompt, sampling=greedy(max_tokens)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
        await worker.stop(drain_timeout=0)


async def test_cancel_and_client_disconnect_abort_the_request(llama_dir: Path) -> None:
    worker, stub, channel = await start(worker_config(llama_dir))
    engine = worker.service.engine
    try:
        stream = stub.Generate(
            pb.GenerateRequest(request_id="c", prompt_token_ids=PROMPT, sampling=greedy(400))
        )
        await stream.read()
        assert (await stub.Cancel(pb.CancelRequest(request_id="c"))).found
        _, messages = await collect(stream)
        assert messages[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert not (await stub.Cancel(pb.CancelRequest(request_id="c"))).found

        stream = stub.Generate(
            pb.GenerateRequest(request_id="d", prompt_token_ids=PROMPT, sampling=greedy(400))
        )
        await stream.read()
        stream.cancel()  # the client goes away
        for _ in range(200):
            if not engine.num_live:
                break
            await asyncio.sleep(0.02)
        assert engine.num_live == 0 and engine.blocks.num_free == engine.num_blocks
    finally:
        await channel.close()
        await worker.stop(drain_timeout=0)


async def test_kv_event_stream_reports_stored_blocks(llama_dir: Path) -> None:
    worker, stub, channel = await start(worker_config(llama_dir))
    try:
        events = stub.StreamKvEvents(pb.KvEventsRequest())
        snapshot = await events.read()
        assert snapshot.sequence == 1 and snapshot.events[0].kind == pb.KvEvent.KIND_CLEARED
        await collect(stub.Generate(pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=greedy(2))))
        stored: list[int] = []
        last = 1
        while len(stored) < 6:
            batch = await asyncio.wait_for(events.read(), 5)
            assert batch.sequence == last + 1 and batch.worker_id == "w-both"
            last = batch.sequence
            for event in batch.events:
                assert event.kind == pb.KvEvent.KIND_STORED and event.medium == pb.KV_MEDIUM_DEVICE
                stored += event.block_hashes
        assert stored == block_hashes(PROMPT, 4)
        events.cancel()
    finally:
        await channel.close()
        await worker.stop(drain_timeout=0)


def test_sigterm_drains_running_requests_then_exits_zero(llama_dir: Path) -> None:
    config = worker_config(llama_dir, drain_timeout_s=20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tusk.worker", "--config-json", config.model_dump_json()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and ready["role"] == "both" and ready["worker_id"] == "w-both"

        async def scenario() -> tuple:
            async with grpc.aio.insecure_channel(ready["address"]) as channel:
                stub = rpc.WorkerStub(channel)
                stream = stub.Generate(pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=greedy(200)))
                first = await stream.read()
                proc.send_signal(signal.SIGTERM)
                status = pb.HealthResponse.STATUS_SERVING
                for _ in range(100):
                    status = (await stub.Health(pb.HealthRequest())).status
                    if status == pb.HealthResponse.STATUS_DRAINING:
                        break
                    await asyncio.sleep(0.02)
                running = (await stub.GetLoad(pb.LoadRequest())).running_requests
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(
                        stub.Generate(pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=greedy(2)))
                    )
                tokens, messages = await collect(stream)
                return list(first.token_ids) + tokens, messages, err.value.code(), status, running

        tokens, messages, refused, status, running = asyncio.run(scenario())
        assert status == pb.HealthResponse.STATUS_DRAINING and running == 1
        assert refused == grpc.StatusCode.UNAVAILABLE
        assert len(tokens) == 200 and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""  # one ready line, then quiet
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_model_folder_exits_with_a_clear_message(tmp_path: Path) -> None:
    config = WorkerConfig(model=str(tmp_path / "nope"))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tusk.worker", "--config-json", config.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert result.stdout == "" and time.monotonic() - started < 120


def _slow_steps(engine, seconds: float = 0.01) -> None:
    """Make every engine step take at least ``seconds``, so a deadline lands mid-stream."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step


@pytest.mark.parametrize(
    ("read_delay_s", "max_tokens", "deadline_s"),
    [(0.0, 200, 0.2), (0.2, 400, 0.5)],
    ids=["client-keeps-up", "client-reads-slowly"],  # slow: nothing may wait at a yield past it
)
async def test_deadline_ends_the_request(
    llama_dir: Path, read_delay_s: float, max_tokens: int, deadline_s: float
) -> None:
    worker, stub, channel = await start(worker_config(llama_dir))
    engine = worker.service.engine
    _slow_steps(engine)  # the tiny model can finish its tokens within the deadline otherwise
    try:
        request = pb.GenerateRequest(
            prompt_token_ids=PROMPT, sampling=greedy(max_tokens), deadline_unix_s=time.time() + deadline_s
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request):
                await asyncio.sleep(read_delay_s)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(200):
            if not engine.num_live:
                break
            await asyncio.sleep(0.02)
        assert engine.num_live == 0
    finally:
        await channel.close()
        await worker.stop(drain_timeout=0)


async def test_many_concurrent_streams_with_cancellations(llama_dir: Path) -> None:
    config = worker_config(llama_dir)
    config.engine = EngineConfig(num_kv_blocks=96, block_size=4, max_num_batched_tokens=64)
    worker, stub, channel = await start(config)
    try:
        prompts = [[(i * 31 + j * 7) % 250 + 3 for j in range(5 + i % 17)] for i in range(24)]

        async def one(i: int) -> list[int] | None:
            stream = stub.Generate(
                pb.GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompts[i], sampling=greedy(12))
            )
            if i % 6 == 5:
                await stream.read()
                stream.cancel()
                return None
            tokens, messages = await collect(stream)
            assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
            return tokens

        results = await asyncio.gather(*(one(i) for i in range(24)))
        for i, tokens in enumerate(results):
            if tokens is not None:
                assert tokens == hf_greedy(llama_dir, prompts[i], 12), i
        engine = worker.service.engine
        for _ in range(200):
            if not engine.num_live:
                break
            await asyncio.sleep(0.02)
        assert engine.num_live == 0 and engine.blocks.num_free == engine.num_blocks
    finally:
        await channel.close()
        await worker.stop(drain_timeout=0)
