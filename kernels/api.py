"""The public ops: validate arguments once, then dispatch to the chosen backend."""

from __future__ import annotations

import torch
from tusk.kernels import reference, validate
from tusk.kernels.registry import dispatch
from tusk.kernels.sampling_core import SamplingBatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, fp32 math, output in x's dtype."""
    validate.rms_norm("rms_norm", x, weight)
    if x.numel() == 0:
        return torch.empty_like(x)
    return dispatch("rms_norm", x, weight, float(eps))


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype before the norm."""
    validate.rms_norm("fused_add_rms_norm", x, weight)
    validate.same_shape("fused_add_rms_norm", x, residual, "x and residual")
    if x.numel() == 0:
        return torch.empty_like(x), torch.empty_like(x)
    return dispatch("fused_add_rms_norm", x, residual, weight, float(eps))


def rope_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """[max_position, head_dim]: cos in the first half, sin in the second (built once, on CPU, in fp32)."""
    return reference.rope_cos_sin_cache(head_dim, max_position, base, rope_scaling, dtype, device)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions; neox (halves) or gpt-j (interleaved) pairing."""
    validate.apply_rotary("apply_rotary", q, k, positions, cos_sin_cache)
    if q.shape[0] == 0:
        return torch.empty_like(q), torch.empty_like(k)
    return dispatch("apply_rotary", q, k, positions, cos_sin_cache, bool(is_neox))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x[..., 2I]."""
    validate.silu_and_mul("silu_and_mul", x)
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    return dispatch("silu_and_mul", x)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store token t's K/V at slot_mapping[t] = block * block_size + offset; slot -1 skips the token."""
    validate.write_kv_cache("write_kv_cache", k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    dispatch("write_kv_cache", k, v, k_cache, v_cache, slot_mapping)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for a ragged batch of query chunks over their whole paged context."""
    validate.paged_prefill_attention(
        "paged_prefill_attention", q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables
    )
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return dispatch(
        "paged_prefill_attention", q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, float(scale)
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (at position context_len - 1) over its paged context."""
    validate.paged_decode_attention("paged_decode_attention", q, k_cache, v_cache, context_lens, block_tables)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return dispatch("paged_decode_attention", q, k_cache, v_cache, context_lens, block_tables, float(scale))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row: greedy, or temperature/top-k/top-p sampling seeded per request."""
    validate.sample("sample", logits, batch)
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    return dispatch("sample", logits, batch)


def gather_kv_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Copy blocks out of the [L, 2, N, bs, Hkv, D] cache into a contiguous [n, L, 2, bs, Hkv, D]."""
    validate.kv_blocks("gather_kv_blocks", kv_cache, block_ids)
    return dispatch("gather_kv_blocks", kv_cache, block_ids)


def scatter_kv_blocks(blocks: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Inverse of gather_kv_blocks: write blocks[i] into cache block block_ids[i], in place."""
    validate.kv_blocks("scatter_kv_blocks", kv_cache, block_ids, blocks)
    if block_ids.shape[0] == 0:
        return
    dispatch("scatter_kv_blocks", blocks, kv_cache, block_ids)
