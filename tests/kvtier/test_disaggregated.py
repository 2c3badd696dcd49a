"""Prefill on one engine, decode on another, KV handed over through a real Valkey server.

The decode engine has no host cache, so every prompt block it reuses came out of Redis. The
reference is the same model generating on one engine without any tier (aggregated).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis
from kvtier_helpers import metric
from tusk.worker.engine import LLMEngine, RequestOutput
from tusk.worker.sequence import SamplingParams

from tusk.config import EngineConfig, KVTierConfig, Role
from tusk.hashing import block_hashes
from tusk.kvformat import HEADER_FIXED_BYTES, block_key

BLOCK = 16
PROMPT_LEN = 5 * BLOCK + 7  # five full blocks and a partial one
MAX_TOKENS = 8


@pytest.fixture(scope="session")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (qkv biases, another architecture than the embedded model)."""
    import torch
    import transformers

    torch.manual_seed(1)
    config = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("kvtier-random-model")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(params=["tiny", "random"])
def model(request, tiny_model: Path) -> Path:
    return tiny_model if request.param == "tiny" else request.getfixturevalue("random_model")


def engine_config() -> EngineConfig:
    return EngineConfig(device="cpu", dtype="float32", block_size=BLOCK, num_kv_blocks=48, max_num_seqs=4)


def make_engine(model: Path, role: Role, tier: KVTierConfig | None) -> LLMEngine:
    return LLMEngine(model, engine_config(), role=role, kv_tier=tier)


def tier_config(url: str, timeout_s: float = 1.0) -> KVTierConfig:
    return KVTierConfig(url=url, host_cache_blocks=0, timeout_s=timeout_s)


def prompt_for(model: Path) -> list[int]:
    vocab = 300 if "random" in str(model) else 100000
    return [(i * 7919 + 13) % (vocab - 3) + 3 for i in range(PROMPT_LEN)]


def run_to_end(engine: LLMEngine, request_id: str, limit_s: float = 60.0) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    deadline = time.monotonic() + limit_s
    while not (outputs and outputs[-1].finished):
        assert time.monotonic() < deadline, "engine did not finish the request"
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def sampling() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


def aggregated(model: Path, prompt: list[int]) -> list[int]:
    engine = make_engine(model, Role.BOTH, None)
    try:
        return engine.generate([prompt], sampling())[0]
    finally:
        engine.close()


def blocks_in_tier(engine: LLMEngine, prompt: list[int], url: str) -> int:
    keys = [block_key(engine.fingerprint, h) for h in block_hashes(prompt, BLOCK)]
    raw = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return sum(raw.exists(k) for k in keys)
    except redis.RedisError:
        return 0
    finally:
        raw.close()


def prefill(model: Path, prompt: list[int], url: str) -> tuple[int, int]:
    """A prefill worker's part: returns (first token, blocks the flush confirmed in the tier)."""
    engine = make_engine(model, Role.PREFILL, tier_config(url))
    try:
        engine.add_request("p", prompt, sampling(), prefill_only=True)
        final = run_to_end(engine, "p")[-1]
        written = engine.connector.flush("p", 10).result(timeout=15)
    finally:
        engine.close()
    assert written == blocks_in_tier(engine, prompt, url)
    return final.new_token_ids[0], written


def decode(
    model: Path, prompt: list[int], first: int, url: str, timeout_s: float = 1.0
) -> tuple[list[int], int]:
    """Run a decode worker's part; returns (all generated tokens, prompt tokens reused)."""
    engine = make_engine(model, Role.DECODE, tier_config(url, timeout_s))
    try:
        engine.add_request("d", prompt, sampling(), first_token=first)
        outputs = run_to_end(engine, "d")
        tokens = [first] + [t for o in outputs for t in o.new_token_ids]
        return tokens, outputs[-1].cached_tokens
    finally:
        engine.close()


async def test_disaggregated_equals_aggregated(model, kv_server):
    prompt = prompt_for(model)
    expected = aggregated(model, prompt)
    first, written = prefill(model, prompt, kv_server.url)
    assert written == PROMPT_LEN // BLOCK
    tokens, reused = decode(model, prompt, first, kv_server.url)
    assert tokens == expected
    assert reused == written * BLOCK  # the decode side computed none of the full blocks


async def test_corrupt_block_is_recomputed(tiny_model, kv_server):
    prompt = prompt_for(tiny_model)
    expected = aggregated(tiny_model, prompt)
    first, written = prefill(tiny_model, prompt, kv_server.url)
    assert written == 5
    # Damage the third block's payload in place.
    engine = make_engine(tiny_model, Role.DECODE, None)
    key = block_key(engine.fingerprint, block_hashes(prompt, BLOCK)[2])
    engine.close()
    raw = redis.Redis.from_url(kv_server.url)
    offset = HEADER_FIXED_BYTES + 4 * 5 + 1000
    raw.setrange(key, offset, bytes([raw.getrange(key, offset, offset)[0] ^ 0x40]))
    raw.close()
    before = metric("tusk_kvtier_corrupt_blocks_total")
    tokens, reused = decode(tiny_model, prompt, first, kv_server.url)
    assert tokens == expected
    assert reused == 2 * BLOCK
    assert metric("tusk_kvtier_corrupt_blocks_total") == before + 1


async def test_server_killed_before_decode(tiny_model, kv_server):
    prompt = prompt_for(tiny_model)
    expected = aggregated(tiny_model, prompt)
    first, _ = prefill(tiny_model, prompt, kv_server.url)
    kv_server.kill()
    started = time.monotonic()
    tokens, reused = decode(tiny_model, prompt, first, kv_server.url)
    assert tokens == expected and reused == 0
    assert time.monotonic() - started < 30


async def test_server_stalled_during_decode_load(tiny_model, kv_server):
    """A server that stops answering (SIGSTOP) costs one timeout, then the prompt is recomputed."""
    prompt = prompt_for(tiny_model)
    expected = aggregated(tiny_model, prompt)
    first, _ = prefill(tiny_model, prompt, kv_server.url)
    os.kill(kv_server.process.pid, signal.SIGSTOP)
    try:
        tokens, reused = decode(tiny_model, prompt, first, kv_server.url, timeout_s=0.3)
    finally:
        os.kill(kv_server.process.pid, signal.SIGCONT)
    assert tokens == expected and reused == 0


async def test_server_killed_while_prefill_writes(tiny_model, kv_server):
    """Prefill still answers (writes become misses) and decode recomputes what is missing."""
    prompt = prompt_for(tiny_model)
    expected = aggregated(tiny_model, prompt)
    engine = make_engine(tiny_model, Role.PREFILL, tier_config(kv_server.url))
    try:
        engine.add_request("p", prompt, sampling(), prefill_only=True)
        kv_server.kill()
        final = run_to_end(engine, "p")[-1]
        first = final.new_token_ids[0]
        assert engine.connector.flush("p", 10).result(timeout=15) == 0
    finally:
        engine.close()
    tokens, reused = decode(tiny_model, prompt, first, kv_server.url)
    assert tokens == expected and reused == 0


async def test_aggregated_engine_with_tier_survives_server_death(tiny_model, kv_server):
    """A both-role engine that writes through keeps generating identical tokens after the kill."""
    prompts = [prompt_for(tiny_model), [p + 1 for p in prompt_for(tiny_model)]]
    expected = [aggregated(tiny_model, p) for p in prompts]
    engine = make_engine(tiny_model, Role.BOTH, tier_config(kv_server.url))
    try:
        assert engine.generate([prompts[0]], sampling()) == [expected[0]]
        kv_server.kill()
        assert engine.generate([prompts[1]], sampling()) == [expected[1]]
    finally:
        engine.close()
