"""Sliding-window (and soft-capped) attention over the paged KV cache.

A layer with window ``W`` lets the query at position ``q`` see keys at positions ``k`` with
``q - W < k <= q`` (transformers' ``sliding_window_overlay``). While every sequence in the batch is
shorter than the window that is plain causal attention, and the model uses the fast paged kernels;
past it, this plain torch path reads only the blocks inside each sequence's window. It runs one
prefill chunk at a time; decodes, the hot path, run as one batched gather and softmax.
Gemma 2 caps every attention score (``tanh(s / cap) * cap``), which the paged kernels do not do,
so its layers always take this path.
"""

from __future__ import annotations

import torch


def _attend_window(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_row: torch.Tensor,
    context_len: int,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """q[n, Hq, D] at positions context_len - n .. context_len - 1, over the window of its keys."""
    block_size = k_cache.shape[1]
    first_q = context_len - q.shape[0]
    lo = max(0, first_q - window + 1) if window else 0
    first_block, end_block = lo // block_size, -(-context_len // block_size)
    blocks = block_row[first_block:end_block].long()
    start = lo - first_block * block_size
    keys = k_cache[blocks].flatten(0, 1)[start : start + context_len - lo]
    values = v_cache[blocks].flatten(0, 1)[start : start + context_len - lo]
    group = q.shape[1] // keys.shape[1]
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    kf = keys.to(math_dtype).repeat_interleave(group, dim=1)
    vf = values.to(math_dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(math_dtype), kf) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = first_q + torch.arange(q.shape[0], device=q.device)[:, None]
    k_pos = lo + torch.arange(keys.shape[0], device=q.device)[None, :]
    visible = k_pos <= q_pos
    if window:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vf).to(q.dtype)


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """All decodes at once: each row's last ``span`` positions are gathered from the paged cache
    into one padded [B, span, Hkv, D] tensor (positions before 0 masked), then one batched softmax."""
    block_size = k_cache.shape[1]
    lens = context_lens.long()
    longest = int(lens.max())  # one host sync per layer call; decodes are the hot path
    span = min(window, longest) if window else longest
    pos = lens[:, None] - span + torch.arange(span, device=q.device)[None, :]
    valid = pos >= 0
    pos = pos.clamp(min=0)
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size
    group = q.shape[1] // k_cache.shape[2]
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    keys = k_cache.flatten(0, 1)[slots].to(math_dtype).repeat_interleave(group, dim=2)
    values = v_cache.flatten(0, 1)[slots].to(math_dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.to(math_dtype), keys) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", torch.softmax(scores, dim=-1), values).to(q.dtype)


def windowed_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scale: float,
    window: int | None,
    softcap: float | None = None,
):
    """Attention for the whole mixed batch (decodes first, then prefill chunks) with a sliding
    window and/or Gemma 2's score soft-capping (``tanh(s / cap) * cap`` before the mask)."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_batch(
            q[:nd],
            k_cache,
            v_cache,
            meta.decode_context_lens,
            meta.decode_block_tables,
            scale,
            window,
            softcap,
        )
    if nd < q.shape[0]:
        cu = meta.prefill_cu_seqlens.tolist()
        for b, context_len in enumerate(meta.prefill_context_lens.tolist()):
            start, end = nd + cu[b], nd + cu[b + 1]
            if end > start:
                out[start:end] = _attend_window(
                    q[start:end],
                    k_cache,
                    v_cache,
                    meta.prefill_block_tables[b],
                    context_len,
                    scale,
                    window,
                    softcap,
                )
    return out
