"""The real worker's LoadReport carries the meanings defined on LoadReport in worker.proto.

The routing policies read the same fields from the emulator and the simulator, so each field is
pinned here on the real engine: a chunked prefill's remainder is queued prefill work, a queued
request counts the tokens it will not find cached, and decode_step_s averages pure-decode steps.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from test_worker_server import PROMPT, greedy, start
from tusk.worker.engine import LLMEngine
from tusk.worker.sequence import SamplingParams
from worker_models import run_all

from tusk.config import EngineConfig, KVTierConfig, WorkerConfig
from tusk.protocol import pb

CHUNK = 8  # prefill tokens per step
OTHER = [(i * 53 + 7) % 250 + 3 for i in range(10)]  # shares no block with PROMPT


def engine_config(max_num_seqs: int = 1) -> EngineConfig:
    return EngineConfig(
        num_kv_blocks=64, block_size=4, max_num_seqs=max_num_seqs, max_num_batched_tokens=CHUNK
    )


def test_chunked_prefill_remainder_and_queued_prompts_are_queued_prefill_tokens(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, engine_config())
    try:
        sp = SamplingParams(max_tokens=2, ignore_eos=True)
        engine.add_request("long", PROMPT, sp)
        # accepted, not yet taken in by a step: already queued
        load = engine.load()
        assert (load["running_requests"], load["queued_requests"]) == (0, 1)
        assert load["queued_prefill_tokens"] == len(PROMPT)

        engine.step()  # the first 8-token chunk of 27
        load = engine.load()
        assert (load["running_requests"], load["queued_requests"]) == (1, 0)
        assert load["queued_prefill_tokens"] == len(PROMPT) - CHUNK
        assert load["free_blocks"] == 64 - CHUNK // 4 and load["total_blocks"] == 64

        engine.add_request("behind", OTHER, sp)  # waits: one sequence at a time
        engine.step()
        load = engine.load()
        assert (load["running_requests"], load["queued_requests"]) == (1, 1)
        assert load["queued_prefill_tokens"] == len(PROMPT) - 2 * CHUNK + len(OTHER)

        engine.step()  # 24 of 27
        engine.step()  # the last 3: "long" samples its first token and decodes from now on
        assert engine.scheduler.running[0].outputs
        load = engine.load()
        assert (load["running_requests"], load["queued_requests"]) == (1, 1)
        assert load["queued_prefill_tokens"] == len(OTHER)  # a decode adds nothing
        run_all(engine)
        assert engine.load()["queued_prefill_tokens"] == 0
    finally:
        engine.close()


def test_queued_request_is_credited_with_its_cached_prefix(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, engine_config())
    try:
        sp = SamplingParams(max_tokens=1, ignore_eos=True)
        engine.add_request("warm", PROMPT, sp)
        run_all(engine)  # PROMPT's 6 full blocks are cached now
        engine.add_request("busy", OTHER * 2, sp)
        engine.step()  # "busy" runs its first chunk; nothing else may start
        engine.add_request("again", PROMPT, sp)
        engine.step()
        load = engine.load()
        assert load["queued_requests"] == 1
        # 20 - 16 of "busy" left, and of "again" only the last, uncached block's 3 tokens
        assert load["queued_prefill_tokens"] == (2 * len(OTHER) - 2 * CHUNK) + (len(PROMPT) - 24)
        outs = run_all(engine)
        assert outs["again"][-1].cached_tokens == 24  # the credit was what the engine reused
    finally:
        engine.close()


def test_cached_prefix_credit_follows_evictions(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, engine_config())
    try:
        sp = SamplingParams(max_tokens=1, ignore_eos=True)
        engine.add_request("warm", PROMPT, sp)
        run_all(engine)
        engine.add_request("busy", OTHER * 2, sp)
        engine.add_request("again", PROMPT, sp)
        engine.step()
        engine.step()
        busy_left = 2 * len(OTHER) - 2 * CHUNK
        assert engine.load()["queued_prefill_tokens"] == busy_left + len(PROMPT) - 24
        engine.blocks.reset_cache()  # PROMPT's cached blocks are gone while "again" waits
        assert engine.scheduler.queued_prefill_tokens() == busy_left + len(PROMPT)
    finally:
        engine.close()


def test_decode_step_s_averages_only_pure_decode_steps(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, engine_config())
    try:
        # 9 tokens in chunks of 8: the second step computes one prompt token, a prefill step
        engine.add_request("a", PROMPT[: CHUNK + 1], SamplingParams(max_tokens=3, ignore_eos=True))
        engine.step()
        assert engine.load()["prefill_tokens_per_s"] > 0
        engine.step()
        assert engine.scheduler.running[0].outputs  # the first token is out
        assert engine.load()["decode_step_s"] == 0.0  # no pure-decode step yet
        engine.step()
        assert engine.load()["decode_step_s"] > 0.0
    finally:
        engine.close()


async def test_get_load_reports_a_chunked_prefill_in_progress(llama_dir: Path) -> None:
    config = WorkerConfig(
        model=str(llama_dir),
        worker_id="w-load",
        engine=engine_config(),
        kv_tier=KVTierConfig(host_cache_blocks=0),
    )
    worker, stub, channel = await start(config)
    engine = worker.service.engine
    run, calls, held, release = engine.runner.run, [0], threading.Event(), threading.Event()

    def hold_second_chunk(batch):
        calls[0] += 1
        if calls[0] == 2:  # the first chunk's figures are published; hold the engine here
            held.set()
            release.wait(30)
        return run(batch)

    engine.runner.run = hold_second_chunk
    try:
        stream = stub.Generate(
            pb.GenerateRequest(request_id="long", prompt_token_ids=PROMPT, sampling=greedy(2))
        )
        assert await asyncio.to_thread(held.wait, 30)
        load = await stub.GetLoad(pb.LoadRequest())
        assert (load.running_requests, load.queued_requests) == (1, 0)
        assert load.queued_prefill_tokens == len(PROMPT) - CHUNK

        other = stub.Generate(
            pb.GenerateRequest(request_id="other", prompt_token_ids=OTHER, sampling=greedy(2))
        )
        for _ in range(200):  # the request reaches the (held) engine: accepted, not yet stepped
            if engine.num_live == 2:
                break
            await asyncio.sleep(0.05)
        load = await stub.GetLoad(pb.LoadRequest())
        assert (load.running_requests, load.queued_requests) == (1, 1)
        assert load.queued_prefill_tokens == len(PROMPT) - CHUNK + len(OTHER)

        release.set()
        assert len([m async for m in stream]) >= 1 and len([m async for m in other]) >= 1
        load = await stub.GetLoad(pb.LoadRequest())
        assert (load.running_requests, load.queued_requests, load.queued_prefill_tokens) == (0, 0, 0)
    finally:
        release.set()
        await channel.close()
        await worker.stop(drain_timeout=0)
