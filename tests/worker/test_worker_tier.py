"""Prefill on one engine, decode on another, with the KV handed over through a real Valkey tier."""

from __future__ import annotations

import random
from pathlib import Path

from tusk.worker.engine import LLMEngine
from tusk.worker.sequence import SamplingParams
from worker_models import hf_greedy, run_all

from tusk.config import EngineConfig, KVTierConfig, Role


def test_split_through_tier_matches_transformers(llama_dir: Path, kv_server) -> None:
    tier = KVTierConfig(url=kv_server.url, host_cache_blocks=0)
    cfg = EngineConfig(num_kv_blocks=64, block_size=4)
    prefill = LLMEngine(llama_dir, cfg, role=Role.PREFILL, kv_tier=tier)
    decode = LLMEngine(llama_dir, cfg, role=Role.DECODE, kv_tier=tier)
    try:
        rng = random.Random(21)
        prompt = [rng.randrange(3, 256) for _ in range(30)]  # 7 full blocks + 2 tokens
        sp = SamplingParams(max_tokens=10, ignore_eos=True)
        prefill.add_request("r", prompt, sp, prefill_only=True)
        (first,) = run_all(prefill)["r"]
        assert prefill.connector is not None
        assert prefill.connector.flush("r", 5.0).result(timeout=10) == 7

        decode.add_request("r", prompt, sp, first_token=first.new_token_ids[0])
        outs = run_all(decode)["r"]
        tokens = first.new_token_ids + [t for o in outs for t in o.new_token_ids]
        assert tokens == hf_greedy(llama_dir, prompt, 10)
        # Every full block came from the tier; only the partial tail was computed locally.
        assert outs[-1].cached_tokens == 28
        assert decode.scheduler.tier_hit_tokens == 28
    finally:
        prefill.close()
        decode.close()


def test_dead_tier_means_recompute_not_failure(llama_dir: Path, kv_server) -> None:
    tier = KVTierConfig(url=kv_server.url, host_cache_blocks=0, timeout_s=0.5)
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, block_size=4), kv_tier=tier)
    try:
        kv_server.kill()
        prompt = list(range(3, 40))
        out = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))
        assert out == [hf_greedy(llama_dir, prompt, 6)]
    finally:
        engine.close()
