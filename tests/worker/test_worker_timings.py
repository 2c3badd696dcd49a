"""The worker measures queueing, prefill compute and the KV handoff apart, and reports them.

Only lower bounds are asserted (a slowed forward pass sets them), so a busy machine can only
make the measured times larger, never fail a test.
"""

from __future__ import annotations

import time
from pathlib import Path

from test_worker_server import PROMPT, collect, greedy, start, worker_config
from tusk.worker.engine import LLMEngine
from tusk.worker.sequence import SamplingParams
from worker_models import hf_greedy, run_all

from tusk.config import EngineConfig, Role
from tusk.protocol import pb

SLOW_S = 0.05  # added to every forward pass


def slow_runner(engine: LLMEngine, delay_s: float = SLOW_S) -> None:
    """Make every forward pass take at least ``delay_s`` (the compute the timings must see)."""
    run = engine.runner.run

    def slow_run(batch):
        time.sleep(delay_s)
        return run(batch)

    engine.runner.run = slow_run


def test_queue_and_chunked_prefill_are_measured_apart(llama_dir: Path) -> None:
    # One sequence at a time, prompts in 8-token chunks: the second request waits for the
    # whole first one, and a 27-token prompt takes four forward passes.
    cfg = EngineConfig(num_kv_blocks=64, block_size=4, max_num_seqs=1, max_num_batched_tokens=8)
    engine = LLMEngine(llama_dir, cfg)
    try:
        slow_runner(engine)
        sp = SamplingParams(max_tokens=6, ignore_eos=True)
        engine.add_request("long", PROMPT, sp)
        engine.add_request("behind", PROMPT[:5], sp)
        outs = run_all(engine)
        first_long, first_behind = outs["long"][0], outs["behind"][0]
        # four prefill chunks, each at least one slowed pass; queueing is not in it
        assert first_long.prefill_s >= 4 * SLOW_S
        assert first_long.queue_s >= 0
        # "behind" waited for "long"'s 4 prefill chunks and 5 decode steps
        assert first_behind.queue_s >= 9 * SLOW_S
        assert first_behind.prefill_s >= SLOW_S
        assert first_long.handoff_s == first_behind.handoff_s == 0
        tokens = [t for o in outs["long"] for t in o.new_token_ids]
        assert tokens == hf_greedy(llama_dir, PROMPT, 6)
    finally:
        engine.close()


async def test_prefill_and_generate_report_timings(llama_dir: Path) -> None:
    worker, stub, channel = await start(worker_config(llama_dir))
    try:
        reply = await stub.Prefill(
            pb.PrefillRequest(request_id="p", prompt_token_ids=PROMPT, sampling=greedy(4))
        )
        assert reply.queue_s >= 0 and reply.prefill_s > 0

        slow_runner(worker.service.engine)
        reply = await stub.Prefill(
            pb.PrefillRequest(request_id="q", prompt_token_ids=PROMPT, sampling=greedy(4))
        )
        assert reply.prefill_s >= SLOW_S

        tokens, messages = await collect(
            stub.Generate(pb.GenerateRequest(request_id="g", prompt_token_ids=PROMPT[1:], sampling=greedy(4)))
        )
        assert tokens == hf_greedy(llama_dir, PROMPT[1:], 4)
        assert messages[0].prefill_s >= SLOW_S and messages[0].queue_s >= 0
        assert messages[0].handoff_s == 0  # aggregated
    finally:
        await channel.close()
        await worker.stop(drain_timeout=0)


async def test_handoff_is_reported_for_a_decode_continuation_only(llama_dir: Path, kv_server) -> None:
    prefill, p_stub, p_chan = await start(worker_config(llama_dir, Role.PREFILL, kv_server.url))
    decode, d_stub, d_chan = await start(worker_config(llama_dir, Role.BOTH, kv_server.url))
    try:
        sp = greedy(5)
        other = [t + 1 for t in PROMPT]
        for request_id, prompt in (("r", PROMPT), ("s", other)):
            reply = await p_stub.Prefill(
                pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sp)
            )
            assert reply.blocks_in_tier == 6
            if request_id == "r":
                first = reply.first_token

        # The continuation of "r" loads its six blocks from the tier: that is its handoff.
        rest, messages = await collect(
            d_stub.Generate(
                pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT, sampling=sp, first_token=first)
            )
        )
        assert [first, *rest] == hf_greedy(llama_dir, PROMPT, 5)
        assert messages[0].cached_tokens == 24 and messages[0].handoff_s > 0

        # An aggregated request also fetches its prefix from the tier, but that is no handoff.
        tokens, messages = await collect(
            d_stub.Generate(pb.GenerateRequest(request_id="s", prompt_token_ids=other, sampling=sp))
        )
        assert tokens == hf_greedy(llama_dir, other, 5)
        assert messages[0].cached_tokens == 24 and messages[0].handoff_s == 0
        assert messages[0].prefill_s > 0
    finally:
        await p_chan.close()
        await d_chan.close()
        await prefill.stop(drain_timeout=0)
        await decode.stop(drain_timeout=0)
