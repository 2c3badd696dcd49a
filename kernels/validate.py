"""Argument checks shared by every backend, so bad input fails the same clear way everywhere.

Checks that need tensor *values* (positions, slots, lengths) only run for CPU tensors: on a GPU
they would force a device sync on every layer of every step. Messages are only formatted on
failure (these checks run on every op call).
"""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


class KernelInputError(ValueError):
    """An op was called with arguments that break its contract."""

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"tusk.kernels op {op!r}: {reason}")
        self.op, self.reason = op, reason


def _ndim(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if not (isinstance(t, torch.Tensor)):
        raise KernelInputError(op, f"{name} must be a tensor, got {type(t).__name__}")
    if not (t.dim() == ndim):
        raise KernelInputError(op, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _index(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    _ndim(op, name, t, ndim)
    if t.dtype not in _INDEX_DTYPES:
        raise KernelInputError(op, f"{name} must be int32 or int64, got {t.dtype}")


def _same_device(op: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if not (len(devices) == 1):
        raise KernelInputError(op, f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _host_values(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() > 0


# The model passes the same index tensors (positions, slots, lengths, block tables) to every
# layer of a step. Remembering the value range of the last few tensors turns one reduction per
# layer into one per step. The memo holds the tensor itself, so its id cannot be reused by a new
# tensor while remembered, and keys on ``_version``, which every in-place write bumps, so a changed
# tensor is never trusted on stale values.
_RANGE_MEMO: dict[tuple[int, int], tuple[torch.Tensor, int, int]] = {}
_RANGE_MEMO_SIZE = 64


def _value_range(t: torch.Tensor) -> tuple[int, int]:
    key = (id(t), t._version)
    found = _RANGE_MEMO.get(key)
    if found is not None and found[0] is t:
        return found[1], found[2]
    low, high = int(t.min()), int(t.max())
    if len(_RANGE_MEMO) >= _RANGE_MEMO_SIZE:
        _RANGE_MEMO.clear()
    _RANGE_MEMO[key] = (t, low, high)
    return low, high


def rms_norm(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    _ndim(op, "weight", weight, 1)
    if not (x.dim() >= 1 and x.shape[-1] == weight.shape[0]):
        raise KernelInputError(op, f"x last dim {tuple(x.shape)} must equal weight size {weight.shape[0]}")
    if not (x.is_floating_point()):
        raise KernelInputError(op, f"x must be floating point, got {x.dtype}")
    _same_device(op, x, weight)


def same_shape(op: str, a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if not (a.shape == b.shape):
        raise KernelInputError(
            op, f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not (a.dtype == b.dtype):
        raise KernelInputError(op, f"{names} must have the same dtype, got {a.dtype} and {b.dtype}")


def apply_rotary(op: str, q, k, positions, cache) -> None:
    _ndim(op, "q", q, 3)
    _ndim(op, "k", k, 3)
    _index(op, "positions", positions, 1)
    _ndim(op, "cos_sin_cache", cache, 2)
    _same_device(op, q, k, positions, cache)
    if not (q.shape[0] == k.shape[0] == positions.shape[0]):
        raise KernelInputError(
            op,
            f"q, k and positions must have the same token count, got {q.shape[0]}, {k.shape[0]}, {positions.shape[0]}",
        )
    if not (q.shape[2] == k.shape[2]):
        raise KernelInputError(op, f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    width = cache.shape[1]
    if not (width % 2 == 0 and 0 < width <= q.shape[2]):
        raise KernelInputError(
            op, f"cos_sin_cache width {width} must be even and at most head_dim {q.shape[2]}"
        )
    if _host_values(positions):
        low, high = _value_range(positions)
        if not (low >= 0 and high < cache.shape[0]):
            raise KernelInputError(op, f"positions must lie in [0, {cache.shape[0]}), got [{low}, {high}]")


def silu_and_mul(op: str, x: torch.Tensor) -> None:
    if not (x.dim() >= 1 and x.shape[-1] % 2 == 0):
        raise KernelInputError(op, f"x last dim must be even, got shape {tuple(x.shape)}")


def kv_cache_pair(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _ndim(op, "k_cache", k_cache, 4)
    _ndim(op, "v_cache", v_cache, 4)
    same_shape(op, k_cache, v_cache, "k_cache and v_cache")


def write_kv_cache(op: str, k, v, k_cache, v_cache, slot_mapping) -> None:
    _ndim(op, "k", k, 3)
    same_shape(op, k, v, "k and v")
    kv_cache_pair(op, k_cache, v_cache)
    _index(op, "slot_mapping", slot_mapping, 1)
    _same_device(op, k, v, k_cache, v_cache, slot_mapping)
    if not (k.shape[0] == slot_mapping.shape[0]):
        raise KernelInputError(op, f"k has {k.shape[0]} tokens but slot_mapping has {slot_mapping.shape[0]}")
    if not (k.shape[1:] == k_cache.shape[2:]):
        raise KernelInputError(
            op, f"k heads/dim {tuple(k.shape[1:])} must match cache {tuple(k_cache.shape[2:])}"
        )
    if _host_values(slot_mapping):
        capacity = k_cache.shape[0] * k_cache.shape[1]
        low, high = _value_range(slot_mapping)
        if not (high < capacity and low >= -1):
            raise KernelInputError(op, f"slots must be -1 or in [0, {capacity}), got [{low}, {high}]")


def _attention_common(op, q, k_cache, v_cache, context_lens, block_tables) -> None:
    _ndim(op, "q", q, 3)
    kv_cache_pair(op, k_cache, v_cache)
    _index(op, "context_lens", context_lens, 1)
    _index(op, "block_tables", block_tables, 2)
    _same_device(op, q, k_cache, v_cache, context_lens, block_tables)
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    if not (q.shape[2] == dim):
        raise KernelInputError(op, f"q head dim {q.shape[2]} != cache head dim {dim}")
    if not (kv_heads > 0 and q.shape[1] % kv_heads == 0):
        raise KernelInputError(op, f"query heads {q.shape[1]} must be a multiple of KV heads {kv_heads}")
    if not (block_tables.shape[0] == context_lens.shape[0]):
        raise KernelInputError(
            op, f"block_tables has {block_tables.shape[0]} rows but context_lens has {context_lens.shape[0]}"
        )
    if _host_values(context_lens):
        shortest, longest = _value_range(context_lens)
        if not (shortest >= 0):
            raise KernelInputError(op, "context_lens must be >= 0")
        needed = -(-longest // k_cache.shape[1])
        if not (needed <= block_tables.shape[1]):
            raise KernelInputError(
                op,
                f"context length {longest} needs {needed} blocks but block_tables has {block_tables.shape[1]} columns",
            )
        if block_tables.numel() and not ((top := _value_range(block_tables)[1]) < k_cache.shape[0]):
            raise KernelInputError(op, f"block_tables reference block {top} >= num blocks {k_cache.shape[0]}")


def paged_prefill_attention(op, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables) -> None:
    _attention_common(op, q, k_cache, v_cache, context_lens, block_tables)
    _index(op, "cu_seqlens_q", cu_seqlens_q, 1)
    if not (cu_seqlens_q.shape[0] == context_lens.shape[0] + 1):
        raise KernelInputError(
            op, f"cu_seqlens_q must have B+1={context_lens.shape[0] + 1} entries, got {cu_seqlens_q.shape[0]}"
        )
    if cu_seqlens_q.device.type == "cpu":
        cu = cu_seqlens_q.tolist()
        q_lens = [b - a for a, b in zip(cu, cu[1:], strict=False)]
        if not (cu[0] == 0 and cu[-1] == q.shape[0]):
            raise KernelInputError(
                op, f"cu_seqlens_q must run from 0 to T={q.shape[0]}, got {cu[0]}..{cu[-1]}"
            )
        if not (all(n >= 0 for n in q_lens)):
            raise KernelInputError(op, "cu_seqlens_q must be non-decreasing")
        short = [i for i, (n, c) in enumerate(zip(q_lens, context_lens.tolist(), strict=True)) if c < n]
        if short:
            raise KernelInputError(op, f"sequences {short} have context_lens shorter than their query chunk")


def max_q_len(op: str, cu_seqlens_q: torch.Tensor, given: int | None) -> None:
    """A host-side longest query chunk must be right: a short one would skip query tiles."""
    if given is None:
        return
    if not (isinstance(given, int) and given >= 0):
        raise KernelInputError(op, f"max_q_len must be a non-negative int, got {given!r}")
    if cu_seqlens_q.device.type == "cpu" and cu_seqlens_q.numel() > 1:
        actual = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if given != actual:
            raise KernelInputError(op, f"max_q_len {given} differs from the longest query chunk {actual}")


def paged_decode_attention(op, q, k_cache, v_cache, context_lens, block_tables) -> None:
    _attention_common(op, q, k_cache, v_cache, context_lens, block_tables)
    if not (q.shape[0] == context_lens.shape[0]):
        raise KernelInputError(
            op, f"q has {q.shape[0]} sequences but context_lens has {context_lens.shape[0]}"
        )
    if _host_values(context_lens) and not (_value_range(context_lens)[0] >= 1):
        raise KernelInputError(op, "decode needs context_lens >= 1 (the token being decoded)")


def sample(op: str, logits: torch.Tensor, batch) -> None:
    _ndim(op, "logits", logits, 2)
    if not (batch.temperature.shape[0] == logits.shape[0]):
        raise KernelInputError(
            op, f"logits has {logits.shape[0]} rows but the SamplingBatch has {batch.temperature.shape[0]}"
        )
    if not (logits.shape[0] == 0 or logits.shape[1] > 0):
        raise KernelInputError(op, "logits must have a non-empty vocabulary")


def kv_blocks(
    op: str, kv_cache: torch.Tensor, block_ids: torch.Tensor, blocks: torch.Tensor | None = None
) -> None:
    _ndim(op, "kv_cache", kv_cache, 6)
    if not (kv_cache.shape[1] == 2):
        raise KernelInputError(op, f"kv_cache dim 1 must be 2 (K, V), got {kv_cache.shape[1]}")
    _index(op, "block_ids", block_ids, 1)
    if blocks is not None:
        _ndim(op, "blocks", blocks, 6)
        expected = (block_ids.shape[0], kv_cache.shape[0], 2, *kv_cache.shape[3:])
        if not (tuple(blocks.shape) == expected):
            raise KernelInputError(op, f"blocks must have shape {expected}, got {tuple(blocks.shape)}")
        _same_device(op, blocks, kv_cache, block_ids)
    else:
        _same_device(op, kv_cache, block_ids)
    if _host_values(block_ids):
        low, high = _value_range(block_ids)
        if not (low >= 0 and high < kv_cache.shape[2]):
            raise KernelInputError(op, f"block_ids must lie in [0, {kv_cache.shape[2]}), got [{low}, {high}]")
