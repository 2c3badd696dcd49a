"""Worker performance models for the simulator.

A profile turns batch composition into seconds. One engine step (continuous batching with
chunked prefill, as vLLM/SGLang run it) costs::

    step_s = step_overhead_s + weights_read_s
             + prefill_chunk_tokens / prefill_tokens_per_s
             + prefill_chunk_tokens * attention_context * prefill_attn_s_per_token_pair
             + decode_batch * decode_s_per_seq
             + decode_context_tokens * kv_read_s_per_token

The built-in ``h100-llama8b`` profile is derived from public numbers, not measured here:

* Llama-3.1-8B: 8.0e9 parameters (16 GB in BF16), 32 layers, 8 KV heads x 128 dims, hidden
  4096 (Meta model card). KV per token = 32 * 8 * 128 * 2 (K,V) * 2 B = 128 KiB.
* H100 SXM: 989 TFLOPS dense BF16, 3.35 TB/s HBM3, 80 GB (NVIDIA datasheet).
* Prefill: 2 * 8e9 FLOPs/token at ~50% MFU => ~30k tokens/s; we use 25k tokens/s, in line
  with published vLLM/SGLang prefill throughput for 8B models on one H100 (15-30k tok/s).
  Attention adds 4 * 32 layers * 4096 * context FLOPs per token => ~1.3e-9 s per token-pair
  at ~400 TFLOPS effective.
* Decode: each step reads the weights (16 GB / ~2.5 TB/s effective = 6.4 ms) and the batch's
  KV (128 KiB / 2.5 TB/s = 5.2e-8 s per context token), plus ~4 ms scheduling/launch overhead.
* KV capacity: 0.9 * 80 GB - 16 GB weights - ~4 GB activations ~= 52 GB => ~400k tokens.
* Shared tier fetch: 5 GB/s per worker (TCP to a Valkey-class store); P/D KV handoff: 25 GB/s
  (RDMA-class) + 2 ms latency.

``from_engine_bench`` calibrates a profile from bench/engine.py's JSON summary: any of the keys
``prefill_tokens_per_s``, ``decode_step_s`` (for batch 1), ``kv_capacity_tokens``,
``kv_bytes_per_token`` found there (top level or under ``"results"``) override the base profile.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class WorkerProfile:
    name: str = "h100-llama8b"
    prefill_tokens_per_s: float = 25_000.0
    prefill_attn_s_per_token_pair: float = 1.3e-9
    step_overhead_s: float = 0.004
    weights_read_s: float = 0.0064
    decode_s_per_seq: float = 3.2e-5
    kv_read_s_per_token: float = 5.2e-8
    kv_bytes_per_token: int = 131_072
    kv_capacity_tokens: int = 400_000
    chunk_tokens: int = 8192
    max_num_seqs: int = 256
    tier_bytes_per_s: float = 5e9
    handoff_bytes_per_s: float = 25e9
    handoff_latency_s: float = 0.002

    def step_s(self, chunk_tokens: float, attn_ctx: float, decode_batch: int, decode_ctx: float) -> float:
        return (
            self.step_overhead_s
            + self.weights_read_s
            + chunk_tokens / self.prefill_tokens_per_s
            + chunk_tokens * attn_ctx * self.prefill_attn_s_per_token_pair
            + decode_batch * self.decode_s_per_seq
            + decode_ctx * self.kv_read_s_per_token
        )

    def capacity_blocks(self, block_size: int) -> int:
        return max(1, self.kv_capacity_tokens // block_size)

    def tier_fetch_s_per_block(self, block_size: int) -> float:
        return block_size * self.kv_bytes_per_token / self.tier_bytes_per_s

    def handoff_s(self, blocks: int, block_size: int) -> float:
        return (
            self.handoff_latency_s + blocks * block_size * self.kv_bytes_per_token / self.handoff_bytes_per_s
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, WorkerProfile] = {"h100-llama8b": WorkerProfile()}


def from_engine_bench(data: dict[str, Any], base: WorkerProfile | None = None) -> WorkerProfile:
    base = base or WorkerProfile()
    src = {**data, **data.get("results", {})} if isinstance(data.get("results"), dict) else dict(data)
    changes: dict[str, Any] = {"name": str(src.get("name", "calibrated"))}
    if src.get("prefill_tokens_per_s"):
        changes["prefill_tokens_per_s"] = float(src["prefill_tokens_per_s"])
    if src.get("decode_step_s"):
        # batch-1 step = overhead + weights; keep their ratio, rescale to the measured total
        total = base.step_overhead_s + base.weights_read_s
        scale = float(src["decode_step_s"]) / total
        changes["step_overhead_s"] = base.step_overhead_s * scale
        changes["weights_read_s"] = base.weights_read_s * scale
    for key in ("kv_capacity_tokens", "kv_bytes_per_token"):
        if src.get(key):
            changes[key] = int(src[key])
    return replace(base, **changes)


def load_profile(spec: str) -> WorkerProfile:
    """A built-in profile name, or a JSON file: either a full/partial profile (keys of
    ``WorkerProfile``) or bench/engine.py output (see ``from_engine_bench``)."""
    if spec in PROFILES:
        return PROFILES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown profile {spec!r}: not one of {sorted(PROFILES)} and not a file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"profile {path} must hold a JSON object")
    known = {f.name for f in fields(WorkerProfile)}
    if set(data) & known - {"name"} and set(data) <= known:
        return replace(WorkerProfile(), **data)
    return from_engine_bench(data)
