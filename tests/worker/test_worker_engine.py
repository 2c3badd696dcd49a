"""The engine's greedy output must be token-identical to transformers' generate, however it is batched."""

from __future__ import annotations

import concurrent.futures
import random
from pathlib import Path

import pytest
from tusk.worker.engine import InvalidRequest, LLMEngine
from tusk.worker.sequence import FinishReason, SamplingParams
from worker_models import ARCHS, hf_greedy, run_all

from tusk.config import EngineConfig


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def prompts(count: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


@pytest.mark.parametrize("arch", ARCHS)
def test_single_request_matches_transformers(model_dirs: dict[str, Path], arch: str) -> None:
    engine = LLMEngine(model_dirs[arch], EngineConfig(num_kv_blocks=32, block_size=8))
    prompt = prompts(1, seed=7, lo=20, hi=21)[0]
    assert engine.generate([prompt], greedy(16)) == [hf_greedy(model_dirs[arch], prompt, 16)]


@pytest.mark.parametrize("arch", ARCHS)
def test_sixteen_concurrent_requests_match_transformers(model_dirs: dict[str, Path], arch: str) -> None:
    # A small token budget forces chunked prefill mixed with decodes of other requests.
    engine = LLMEngine(
        model_dirs[arch],
        EngineConfig(num_kv_blocks=256, block_size=4, max_num_batched_tokens=48, max_num_seqs=48),
    )
    batch = prompts(16, seed=11, lo=1, hi=60)
    outputs = engine.generate(batch, greedy(10))
    assert outputs == [hf_greedy(model_dirs[arch], p, 10) for p in batch]


def test_fully_and_partly_cached_prefix_match_transformers(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, block_size=4))
    base = prompts(1, seed=3, lo=32, hi=33)[0]  # 8 full blocks
    extended = base + [5, 6, 7, 8, 9, 10]
    cases = [("cold", base, 0), ("full", base, 28), ("partial", extended, 32)]
    for rid, prompt, expect_cached in cases:
        engine.add_request(rid, prompt, greedy(8))
        outs = run_all(engine)[rid]
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == hf_greedy(llama_dir, prompt, 8), rid
        # Fully cached: every block but the one holding the last prompt token is reused.
        assert outs[-1].cached_tokens == expect_cached, rid
    stats = engine.stats()
    assert stats["cache_hit_tokens"] == 60 and stats["cache_query_tokens"] == 32 + 32 + 38


def test_preemption_recomputes_and_matches_transformers(llama_dir: Path) -> None:
    # 12 blocks of 4 tokens cannot hold 6 sequences of ~40 tokens: the scheduler must preempt.
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64))
    batch = prompts(6, seed=5, lo=10, hi=30)
    outputs = engine.generate(batch, greedy(20))
    assert engine.scheduler.num_preemptions > 0
    assert outputs == [hf_greedy(llama_dir, p, 20) for p in batch]
    assert engine.blocks.num_free == engine.num_blocks  # nothing leaked


def test_decode_continuation_recomputes_without_resampling(llama_dir: Path) -> None:
    """A decode engine lacking the prompt's KV recomputes it and continues from the given first token."""
    prompt = prompts(1, seed=9, lo=23, hi=24)[0]
    reference = hf_greedy(llama_dir, prompt, 12)
    prefill = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=32, block_size=4))
    prefill.add_request("p", prompt, greedy(12), prefill_only=True)
    (out,) = run_all(prefill)["p"]
    assert out.finished and out.new_token_ids == reference[:1] and len(out.block_hashes) == 5

    decode = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=32, block_size=4))
    # A deliberately different first token proves it is used as given, never re-sampled.
    forced = (reference[0] + 1) % 256
    decode.add_request("d", prompt, greedy(12), first_token=forced)
    tokens = [t for o in run_all(decode)["d"] for t in o.new_token_ids]
    assert len(tokens) == 11
    assert tokens == hf_greedy(llama_dir, prompt + [forced], 11)


def test_seeded_sampling_is_reproducible_across_batches(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=128, block_size=4))
    prompt = prompts(1, seed=1, lo=12, hi=13)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = engine.generate([prompt], sp)[0]
    others = prompts(5, seed=2)
    mixed = engine.generate([*others, prompt], [greedy(16)] * 5 + [sp])[-1]
    assert alone == mixed
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True)
    assert engine.generate([prompt], other_seed)[0] != alone

    # Split: first token from a prefill-only run, the rest from a continuation = same stream.
    engine.add_request("p", prompt, sp, prefill_only=True)
    first = run_all(engine)["p"][0].new_token_ids
    engine.add_request("d", prompt, sp, first_token=first[0])
    rest = [t for o in run_all(engine)["d"] for t in o.new_token_ids]
    assert first + rest == alone


def test_stop_conditions(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, block_size=4))
    prompt = prompts(1, seed=4, lo=10, hi=11)[0]
    free_run = engine.generate([prompt], greedy(12))[0]
    stop_at = free_run[4]
    cut = free_run.index(stop_at)
    engine.add_request("s", prompt, SamplingParams(max_tokens=12, stop_token_ids=(stop_at,)))
    outs = run_all(engine)["s"]
    assert [t for o in outs for t in o.new_token_ids] == free_run[: cut + 1]
    assert outs[-1].finish_reason is FinishReason.STOP
    engine.add_request("l", prompt, greedy(3))
    assert run_all(engine)["l"][-1].finish_reason is FinishReason.LENGTH
    # The model's EOS (id 2) stops unless ignore_eos; make it the first token via first_token.
    engine.add_request("e", prompt, SamplingParams(max_tokens=5), first_token=2)
    outs = run_all(engine)["e"]
    assert outs[-1].finish_reason is FinishReason.STOP and not outs[-1].new_token_ids


def test_context_limit_ends_with_length(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, block_size=4, max_model_len=24))
    engine.add_request("r", list(range(3, 23)), greedy(100))
    outs = run_all(engine)["r"]
    assert sum(len(o.new_token_ids) for o in outs) == 4
    assert outs[-1].finish_reason is FinishReason.LENGTH


def test_abort_releases_blocks(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("a", prompts(1, seed=8, lo=20, hi=21)[0], greedy(1000))
    engine.step()
    engine.step()
    assert engine.abort("a")
    assert not engine.abort("missing")
    outs = run_all(engine)["a"]
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT
    assert engine.blocks.num_free == engine.num_blocks


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([], greedy(4), "empty"),
        ([5] * 600, greedy(4), "context"),
        ([5, 300], greedy(4), "vocabulary"),
        ([5, -1], greedy(4), "vocabulary"),
        ([5, 6], greedy(0), "max_tokens"),
    ],
)
def test_bad_input_is_rejected(
    llama_dir: Path, prompt: list[int], sampling: SamplingParams, message: str
) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=8, block_size=4))
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request("bad", prompt, sampling)
    assert not engine.has_unfinished()


def test_prompt_that_can_never_fit_is_rejected(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=4, block_size=4))
    with pytest.raises(InvalidRequest, match="KV blocks"):
        engine.add_request("big", list(range(3, 30)), greedy(4))
    # One that fits alone but outgrows the cache while decoding ends with LENGTH, not a hang.
    engine.add_request("grow", list(range(3, 10)), greedy(100))
    outs = run_all(engine)["grow"]
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert sum(len(o.new_token_ids) for o in outs) == 4 * 4 - 7 + 1


def test_embedded_tiny_model_generates(tiny_model: Path) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=16, block_size=16))
    out = engine.generate([[100264, 882, 198, 9906]], SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out[0]) == 5 and all(0 <= t < 100352 for t in out[0])
    assert engine.spec.eos_token_ids == (100257, 100265)


def test_hash_extra_keys_separate_cache_entries(llama_dir: Path) -> None:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, block_size=4))
    prompt = prompts(1, seed=12, lo=20, hi=21)[0]
    engine.add_request("a", prompt, greedy(2), extra_keys=["adapter-1"])
    run_all(engine)
    engine.add_request("b", prompt, greedy(2), extra_keys=["adapter-2"])
    assert run_all(engine)["b"][-1].cached_tokens == 0
    engine.add_request("c", prompt, greedy(2), extra_keys=["adapter-1"])
    assert run_all(engine)["c"][-1].cached_tokens == 16


class DeferredTier:
    """A KvConnector whose loads finish only when the test says so (and load nothing)."""

    def __init__(self) -> None:
        self.loads: list[tuple[list[int], list[int], concurrent.futures.Future[int]]] = []

    def load(self, block_hashes: list[int], block_ids: list[int]) -> concurrent.futures.Future[int]:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self.loads.append((block_hashes, block_ids, future))
        return future

    def save(self, request_id: str, block_hashes: list[int], block_ids: list[int]) -> None:
        pass

    def finish(self, request_id: str, keep: bool) -> None:
        pass

    def close(self) -> None:
        pass


def test_blocks_under_a_tier_load_stay_reserved_until_it_ends(llama_dir: Path) -> None:
    tier = DeferredTier()
    engine = LLMEngine(
        llama_dir, EngineConfig(num_kv_blocks=32, block_size=4), connector_factory=lambda e: tier
    )
    prompt = prompts(1, seed=13, lo=18, hi=19)[0]  # 4 full blocks + 2 tokens
    engine.add_request("r", prompt, greedy(4))
    engine.step()
    ((hashes, ids, future),) = tier.loads
    assert len(hashes) == 4 and engine.blocks.num_free == 28
    assert engine.abort("r")
    assert engine.step()[0].finish_reason is FinishReason.ABORT
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free == 28  # the tier may still write into them
    future.set_result(0)
    engine.step()
    assert engine.blocks.num_free == 32

    # A load that fails is a miss: the prompt is recomputed and the answer is still right.
    engine.add_request("s", prompt, greedy(4))
    engine.step()
    tier.loads[-1][2].set_exception(ConnectionError("tier down"))
    outs = run_all(engine)["s"]
    assert [t for o in outs for t in o.new_token_ids] == hf_greedy(llama_dir, prompt, 4)
