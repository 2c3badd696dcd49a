"""The `torch` backend: vectorized native torch that runs on every torch device.

Attention uses SDPA on KV gathered from the paged cache with one index_select per bucket of
similar sequence lengths, so decode does no per-token Python work and pads at most 2x. GQA decode
folds the query heads of one KV head into SDPA's query-length axis, so KV is never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tusk.kernels.sampling_core import SamplingBatch, row_uniform

_HALF = (torch.float16, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual if x.dtype == residual.dtype else (x.float() + residual.float()).to(x.dtype)
    return rms_norm(residual_out, weight, eps), residual_out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[-1] // 2
    entries = cos_sin_cache.index_select(0, positions.long()).float()
    cos = entries[:, None, :half]
    sin = entries[:, None, half:]
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    rot = 2 * cos.shape[-1]
    xf = x.float()
    out = xf.clone() if rot < x.shape[-1] else torch.empty_like(xf)
    if is_neox:
        x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 : rot]
        torch.addcmul(x1 * cos, x2, sin, value=-1.0, out=out[..., : rot // 2])
        torch.addcmul(x2 * cos, x1, sin, out=out[..., rot // 2 : rot])
    else:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
        out[..., 0:rot:2] = torch.addcmul(x1 * cos, x2, sin, value=-1.0)
        out[..., 1:rot:2] = torch.addcmul(x2 * cos, x1, sin)
    return out.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    if x.dtype in _HALF:
        xf = x.float()
        return (F.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)
    return F.silu(x[..., :inter]) * x[..., inter:]


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - blocks * block_size
    k_cache.index_put_((blocks, offsets), k.to(k_cache.dtype))
    v_cache.index_put_((blocks, offsets), v.to(v_cache.dtype))


def _gather_sequences(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[b, n_blocks] block ids -> [b, Hkv, n_blocks*bs, D] (one copy, strided view for SDPA)."""
    b, n_blocks = tables.shape
    _, block_size, heads, dim = cache.shape
    flat = cache.index_select(0, tables.reshape(-1).long())
    return flat.view(b, n_blocks * block_size, heads, dim).transpose(1, 2)


def _length_buckets(
    context_lens: torch.Tensor, block_size: int, table_width: int
) -> list[tuple[torch.Tensor | None, int]]:
    """Group rows by the power-of-two ceiling of their block count: (row indices or None=all, blocks)."""
    if context_lens.device.type != "cpu":
        return [(None, table_width)]
    blocks = (context_lens.long() + block_size - 1) // block_size
    max_blocks = int(blocks.max())
    if max_blocks <= 4 or int(blocks.min()) * 2 > max_blocks:
        return [(None, max(max_blocks, 1))]
    buckets = []
    ceiling = torch.where(
        blocks <= 1, torch.ones_like(blocks), 1 << (blocks - 1).clamp(min=0).log2().floor().long() + 1
    )
    for value in torch.unique(ceiling).tolist():
        rows = torch.nonzero(ceiling == value).flatten()
        buckets.append((rows, int(blocks[rows].max())))
    return buckets


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    n_seqs, q_heads, dim = q.shape
    if n_seqs == 0:
        return torch.empty_like(q)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    lens = context_lens.long()
    for rows, n_blocks in _length_buckets(lens, block_size, block_tables.shape[1]):
        tables = (
            block_tables[:, :n_blocks] if rows is None else block_tables.index_select(0, rows)[:, :n_blocks]
        )
        row_lens = lens if rows is None else lens.index_select(0, rows)
        keys = _gather_sequences(k_cache, tables)
        values = _gather_sequences(v_cache, tables)
        row_q = q if rows is None else q.index_select(0, rows)
        # [b, Hq, D] -> [b, Hkv, group, D]: a KV head's query heads become SDPA's query axis.
        row_q = row_q.view(row_q.shape[0], kv_heads, group, dim)
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = (positions[None, :] < row_lens[:, None])[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            row_q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
        )
        attended = attended.reshape(-1, q_heads, dim)
        if rows is None:
            out.copy_(attended)
        else:
            out.index_copy_(0, rows, attended)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b, context_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        n_blocks = -(-context_len // block_size)
        tables = block_tables[b : b + 1, :n_blocks]
        keys = _gather_sequences(k_cache, tables)[:, :, :context_len].to(q.dtype)
        values = _gather_sequences(v_cache, tables)[:, :, :context_len].to(q.dtype)
        seq_q = q[start:end].transpose(0, 1).unsqueeze(0)
        if q_len == context_len:
            attended = F.scaled_dot_product_attention(
                seq_q, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            q_pos = torch.arange(context_len - q_len, context_len, device=q.device)
            mask = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]
            attended = F.scaled_dot_product_attention(
                seq_q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start:end] = attended[0].transpose(0, 1)
    return out


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    device = logits.device
    temperature = batch.temperature.to(device=device, dtype=torch.float32)
    greedy = temperature <= 0
    tokens = torch.argmax(logits, dim=-1)
    if bool(greedy.all()):
        return tokens
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits.float() / safe_temperature[:, None], dim=-1)
    top_k = batch.top_k.to(device=device, dtype=torch.int64)
    top_p = batch.top_p.to(device=device, dtype=torch.float32)
    k_active = (top_k > 0) & (top_k < vocab)
    p_active = (top_p > 0) & (top_p < 1)
    if bool((k_active | p_active).any()):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
        if bool(k_active.any()):
            kth_index = torch.where(k_active, top_k - 1, torch.full_like(top_k, vocab - 1))
            kth = sorted_probs.gather(1, kth_index[:, None])
            keep_sorted &= sorted_probs >= kth
            sorted_probs = torch.where(keep_sorted, sorted_probs, torch.zeros_like(sorted_probs))
        if bool(p_active.any()):
            normed = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
            mass_before = torch.cumsum(normed, dim=-1) - normed
            keep_sorted &= (mass_before < top_p[:, None]) | ~p_active[:, None]
        keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs.double(), dim=-1)
    uniforms = [0.0 if bool(greedy[row]) else row_uniform(batch, row) for row in range(n_rows)]
    thresholds = torch.tensor(uniforms, dtype=torch.float64, device=device)[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, thresholds, right=True).flatten().clamp_(max=vocab - 1)
    return torch.where(greedy, tokens, drawn)


def gather_kv_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    picked = kv_cache.index_select(2, block_ids.long())
    return picked.permute(2, 0, 1, 3, 4, 5).contiguous()


def scatter_kv_blocks(blocks: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    kv_cache.index_copy_(2, block_ids.long(), blocks.permute(1, 2, 0, 3, 4, 5).to(kv_cache.dtype))
