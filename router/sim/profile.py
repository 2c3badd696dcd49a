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

``cpu-tusk-tiny`` is this project's own CPU engine on its ~29.4M-parameter tiny Llama, from
docs/worker.md's measurements (2-core CPU, 1 torch thread): 15.5 ms per decode step at batch 1,
527.8 tok/s at concurrency 32 (60.6 ms per step: +1.45 ms per sequence), 792 ms TTFT for an
uncached 1024-token prompt (~1,300 prompt tok/s); KV 4 layers x 2 heads x 32 dims x 2 x 4 B =
2 KiB per token, 2048 blocks of 16 tokens, chunk 2048 tokens, 64 sequences (EngineConfig
defaults).

``validate`` refuses impossible values (non-positive rates or capacities) so an emulator or a
simulation never starts on a profile that would divide by zero or run backwards in time.
``scaled(k)`` makes one token stand for ``k`` (see its docstring).

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

    def validate(self) -> WorkerProfile:
        """Raise ValueError naming every impossible field; return self when it is sound."""
        positive = (
            "prefill_tokens_per_s",
            "kv_bytes_per_token",
            "kv_capacity_tokens",
            "chunk_tokens",
            "max_num_seqs",
            "tier_bytes_per_s",
            "handoff_bytes_per_s",
        )
        non_negative = (
            "prefill_attn_s_per_token_pair",
            "step_overhead_s",
            "weights_read_s",
            "decode_s_per_seq",
            "kv_read_s_per_token",
            "handoff_latency_s",
        )
        bad = [f"{k} must be > 0 (got {getattr(self, k)!r})" for k in positive if not getattr(self, k) > 0]
        bad += [
            f"{k} must be >= 0 (got {getattr(self, k)!r})" for k in non_negative if not getattr(self, k) >= 0
        ]
        if not bad and self.step_overhead_s + self.weights_read_s <= 0:
            bad.append("step_overhead_s + weights_read_s must be > 0 (a decode step takes time)")
        if bad:
            raise ValueError(f"impossible profile {self.name!r}: " + "; ".join(bad))
        return self

    def scaled(self, token_scale: int) -> WorkerProfile:
        """The same hardware when one prompt token stands for ``token_scale`` trace tokens.

        Replaying a long-context trace live costs the router and the emulator about 4 us of
        tokenization per token, so benchmarks shrink prompts by ``k`` and scale every per-token
        quantity by the same factor: prefill rate / k, attention per token pair x k^2, KV read
        and KV bytes per token x k, capacity and chunk / k. A prompt then takes exactly as long
        to prefill, occupies the same share of the KV cache and transfers as many bytes as the
        unscaled prompt. Output tokens are not scaled (one token = one decode step), so their
        KV counts k times too much -- small next to the prompts of the traces here."""
        if token_scale == 1:
            return self
        if token_scale < 1:
            raise ValueError("token_scale must be >= 1")
        k = token_scale
        return replace(
            self,
            name=f"{self.name}/x{k}",
            prefill_tokens_per_s=self.prefill_tokens_per_s / k,
            prefill_attn_s_per_token_pair=self.prefill_attn_s_per_token_pair * k * k,
            kv_read_s_per_token=self.kv_read_s_per_token * k,
            kv_bytes_per_token=self.kv_bytes_per_token * k,
            kv_capacity_tokens=max(1, self.kv_capacity_tokens // k),
            chunk_tokens=max(1, self.chunk_tokens // k),
        )

    def capacity_blocks(self, block_size: int) -> int:
        return max(1, self.kv_capacity_tokens // block_size)

    def max_model_len(self, block_size: int) -> int:
        """The longest request (prompt + max_tokens) a worker can ever hold: its whole KV
        cache. A real engine refuses longer ones up front (vLLM caps ``max_model_len`` to what
        its KV cache holds and answers 400 "maximum context length"); the emulator and the
        simulator refuse them too, instead of parking them until the worker is idle."""
        return self.capacity_blocks(block_size) * block_size

    def tier_fetch_s_per_block(self, block_size: int) -> float:
        return block_size * self.kv_bytes_per_token / self.tier_bytes_per_s

    def handoff_s(self, blocks: int, block_size: int) -> float:
        return (
            self.handoff_latency_s + blocks * block_size * self.kv_bytes_per_token / self.handoff_bytes_per_s
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, WorkerProfile] = {
    "h100-llama8b": WorkerProfile(),
    # docs/worker.md (bench/engine.py on this project's engine, 2-core CPU); see the module doc
    "cpu-tusk-tiny": WorkerProfile(
        name="cpu-tusk-tiny",
        prefill_tokens_per_s=1_300.0,
        prefill_attn_s_per_token_pair=0.0,
        step_overhead_s=0.0105,
        weights_read_s=0.005,
        decode_s_per_seq=0.00145,
        kv_read_s_per_token=0.0,
        kv_bytes_per_token=2048,
        kv_capacity_tokens=32_768,
        chunk_tokens=2048,
        max_num_seqs=64,
        tier_bytes_per_s=1e9,
        handoff_bytes_per_s=1e9,
        handoff_latency_s=0.001,
    ),
}


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
        return PROFILES[spec].validate()
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
        return replace(WorkerProfile(), **data).validate()
    return from_engine_bench(data).validate()
