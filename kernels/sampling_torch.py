"""Vectorized sampling for the torch backend.

A full-vocabulary sort is slow on CPU (hundreds of ms for 32 x 32k), so top-k/top-p rows work on
a top-k candidate list instead (max k, or TOP_P_CANDIDATES for top-p-only rows). Rows whose
filter cannot be decided inside the candidates (a tie at the top-k boundary, or a nucleus wider
than the candidate list) fall back to the full sort. The final draw is the same inverse CDF in
vocabulary order as the reference, so a seeded row picks the same token on either backend.
"""

from __future__ import annotations

import torch
from tusk.kernels.sampling_core import SamplingBatch, apply_min_p, batch_uniforms, cdf_dtype

TOP_P_CANDIDATES = 1024


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    n_rows, vocab = logits.shape
    device = logits.device
    temperature = batch.temperature.to(device=device, dtype=torch.float32)
    greedy = temperature <= 0
    any_greedy = bool(greedy.any())
    if any_greedy and bool(greedy.all()):
        return torch.argmax(logits, dim=-1)
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = apply_min_p(torch.softmax(logits.float() / safe_temperature[:, None], dim=-1), batch.min_p)
    top_k = batch.top_k.to(device=device, dtype=torch.int64)
    top_p = batch.top_p.to(device=device, dtype=torch.float32)
    k_active = (top_k > 0) & (top_k < vocab) & ~greedy
    p_active = (top_p > 0) & (top_p < 1) & ~greedy
    greedy_rows = greedy.tolist()
    sampled_rows = [row for row in range(n_rows) if not greedy_rows[row]]
    values = [0.0] * n_rows
    for row, value in zip(sampled_rows, batch_uniforms(batch, sampled_rows), strict=True):
        values[row] = value
    uniforms = torch.tensor(values, dtype=cdf_dtype(device), device=device)
    filtered = k_active | p_active
    if bool(filtered.all()):
        return _sample_filtered(probs, top_k, top_p, k_active, p_active, uniforms)
    drawn = (
        torch.argmax(logits, dim=-1) if any_greedy else torch.zeros(n_rows, dtype=torch.int64, device=device)
    )
    plain = torch.nonzero(~greedy & ~filtered).flatten()
    if plain.numel():
        drawn[plain] = _draw(probs[plain], uniforms[plain])
    rows = torch.nonzero(filtered).flatten()
    if rows.numel():
        drawn[rows] = _sample_filtered(
            probs[rows], top_k[rows], top_p[rows], k_active[rows], p_active[rows], uniforms[rows]
        )
    return drawn


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over (already filtered) probs in vocabulary order."""
    cdf = torch.cumsum(probs.to(cdf_dtype(probs.device)), dim=-1)
    position = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True)
    return position.flatten().clamp_(max=probs.shape[1] - 1)


def _sample_filtered(probs, top_k, top_p, k_active, p_active, uniforms) -> torch.Tensor:
    vocab = probs.shape[1]
    needed = int(top_k[k_active].max()) if bool(k_active.any()) else 0
    if bool((p_active & ~k_active).any()):
        needed = max(needed, TOP_P_CANDIDATES)
    n_cand = min(vocab, needed + 1)  # one extra candidate reveals ties at the top-k boundary
    values, ids = torch.topk(probs, n_cand, dim=-1)
    # canonical order: probability descending, token id ascending (a stable sort of the vocabulary)
    ids, by_id = torch.sort(ids, dim=-1)
    values = values.gather(1, by_id)
    order = torch.argsort(values, dim=-1, descending=True, stable=True)
    values, ids = values.gather(1, order), ids.gather(1, order)

    decided = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    keep = torch.ones_like(values, dtype=torch.bool)
    kth = values.gather(1, torch.where(k_active, top_k - 1, torch.full_like(top_k, n_cand - 1))[:, None])
    keep &= (values >= kth) | ~k_active[:, None]
    if n_cand < vocab:
        decided &= ~(k_active & (values[:, -1] >= kth[:, 0]))
    kept = torch.where(keep, values, torch.zeros_like(values))
    if bool(p_active.any()):
        total = torch.where(k_active, kept.sum(dim=-1), probs.sum(dim=-1))
        normed = kept / total[:, None]
        mass_before = torch.cumsum(normed, dim=-1) - normed
        keep &= (mass_before < top_p[:, None]) | ~p_active[:, None]
        if n_cand < vocab:
            decided &= ~(p_active & ~k_active & (normed.sum(dim=-1) < top_p))
        kept = torch.where(keep, values, torch.zeros_like(values))
    by_vocab = torch.argsort(torch.where(keep, ids, torch.full_like(ids, vocab)), dim=-1)
    picked = _draw(kept.gather(1, by_vocab), uniforms)
    tokens = ids.gather(1, by_vocab).gather(1, picked[:, None]).flatten()
    undecided = torch.nonzero(~decided).flatten()
    if undecided.numel():
        tokens[undecided] = _sample_full_sort(
            probs[undecided],
            top_k[undecided],
            top_p[undecided],
            k_active[undecided],
            p_active[undecided],
            uniforms[undecided],
        )
    return tokens


def _sample_full_sort(probs, top_k, top_p, k_active, p_active, uniforms) -> torch.Tensor:
    """The same filters over a sort of the whole vocabulary (slow; only for undecided rows)."""
    vocab = probs.shape[1]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
    kth_index = torch.where(k_active, top_k - 1, torch.full_like(top_k, vocab - 1))
    kth = sorted_probs.gather(1, kth_index[:, None])
    keep_sorted &= (sorted_probs >= kth) | ~k_active[:, None]
    sorted_probs = torch.where(keep_sorted, sorted_probs, torch.zeros_like(sorted_probs))
    normed = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    mass_before = torch.cumsum(normed, dim=-1) - normed
    keep_sorted &= (mass_before < top_p[:, None]) | ~p_active[:, None]
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return _draw(torch.where(keep, probs, torch.zeros_like(probs)), uniforms)
