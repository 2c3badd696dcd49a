"""Reference implementations: plain torch, one obvious step at a time, fp32 math.

These define what every op means. They favour clarity over speed (Python loops per token or
per sequence are fine here); the tests compare every backend against them, and they are also
a selectable backend ("reference") for debugging a suspected kernel bug in production.
"""

from __future__ import annotations

import math

import torch
from tusk.kernels.sampling_core import SamplingBatch, cdf_dtype, row_uniform


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.float()).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(residual_out, weight, eps), residual_out


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (fp32, on CPU), following HF transformers' rope initialisers."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = "default"
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_context = float(rope_scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_cos_sin_cache: unsupported rope_type {rope_type!r} (default, linear, llama3)")


def rope_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_cos_sin_cache: head_dim must be a positive even number, got {head_dim}")
    if max_position < 0:
        raise ValueError(f"rope_cos_sin_cache: max_position must be >= 0, got {max_position}")
    inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
    positions = torch.arange(max_position, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype=dtype, device=device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of x[T, H, D] (fp32 in, fp32 out)."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x_pass], dim=-1)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[-1] // 2
    entries = cos_sin_cache[positions.long()].float()
    cos, sin = entries[:, :half], entries[:, half:]
    q_out = _rotate(q.float(), cos, sin, is_neox).to(q.dtype)
    k_out = _rotate(k.float(), cos, sin, is_neox).to(k.dtype)
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        k_cache[block, offset] = k[token].to(k_cache.dtype)
        v_cache[block, offset] = v[token].to(v_cache.dtype)


def _sequence_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_row: torch.Tensor, context_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [context_len, Hkv, D] of one sequence, read block by block."""
    block_size = k_cache.shape[1]
    n_blocks = -(-context_len // block_size)
    keys = [k_cache[int(b)] for b in block_row[:n_blocks].tolist()]
    values = [v_cache[int(b)] for b in block_row[:n_blocks].tolist()]
    if not keys:
        empty = k_cache.new_zeros((0, *k_cache.shape[2:]))
        return empty, empty
    return torch.cat(keys)[:context_len], torch.cat(values)[:context_len]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int, scale: float):
    """Causal attention of q[Lq, Hq, D] at positions first_pos.. over keys/values[Lk, Hkv, D]."""
    group = q.shape[1] // keys.shape[1]
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    kf = keys.to(math_dtype).repeat_interleave(group, dim=1)
    vf = values.to(math_dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(math_dtype), kf) * scale
    q_pos = first_pos + torch.arange(q.shape[0])[:, None]
    k_pos = torch.arange(keys.shape[0])[None, :]
    scores = scores.masked_fill((k_pos > q_pos).to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,  # a launch-size hint for GPU backends; unused here
) -> torch.Tensor:
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, context_len in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        keys, values = _sequence_kv(k_cache, v_cache, block_tables[b], context_len)
        out[start:end] = _attend(q[start:end], keys, values, context_len - (end - start), scale)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    for b, context_len in enumerate(context_lens.tolist()):
        keys, values = _sequence_kv(k_cache, v_cache, block_tables[b], context_len)
        out[b : b + 1] = _attend(q[b : b + 1], keys, values, context_len - 1, scale)
    return out


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Per row: greedy, or temperature -> min-p -> top-k -> top-p -> inverse-CDF draw with the row's uniform."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for row in range(logits.shape[0]):
        row_logits = logits[row].float()
        temperature = float(batch.temperature[row])
        if temperature <= 0.0:
            out[row] = int(torch.argmax(row_logits))
            continue
        probs = torch.softmax(row_logits / temperature, dim=-1)
        min_p = 0.0 if batch.min_p is None else float(batch.min_p[row])
        if min_p > 0.0:
            probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
        top_k = int(batch.top_k[row])
        if 0 < top_k < probs.shape[0]:
            kth = torch.topk(probs, top_k).values[-1]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        top_p = float(batch.top_p[row])
        if 0.0 < top_p < 1.0:
            order = torch.argsort(probs, descending=True, stable=True)
            sorted_probs = probs[order] / probs.sum()
            mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
            keep_sorted = mass_before < top_p
            keep = torch.zeros_like(keep_sorted)
            keep[order] = keep_sorted
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        cdf = torch.cumsum(probs.to(cdf_dtype(probs.device)), dim=0)
        threshold = row_uniform(batch, row) * float(cdf[-1])
        index = int(
            torch.searchsorted(cdf, torch.tensor([threshold], dtype=cdf.dtype, device=cdf.device), right=True)
        )
        out[row] = min(index, probs.shape[0] - 1)
    return out


def gather_kv_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    blocks = [kv_cache[:, :, int(b)] for b in block_ids.tolist()]
    if not blocks:
        return kv_cache.new_empty((0, kv_cache.shape[0], kv_cache.shape[1], *kv_cache.shape[3:]))
    return torch.stack(blocks).contiguous()


def scatter_kv_blocks(blocks: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    for i, b in enumerate(block_ids.tolist()):
        kv_cache[:, :, int(b)] = blocks[i].to(kv_cache.dtype)
