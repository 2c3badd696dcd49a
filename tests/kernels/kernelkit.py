"""Shared builders for kernel tests: tolerances, paged caches with shuffled blocks, ragged batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (atol, rtol) per output dtype: about two ulps of the output format; fp32 allows reordered sums.
TOLERANCE = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale)


@dataclass
class PagedBatch:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    q: torch.Tensor


def paged_batch(
    context_lens: list[int],
    query_lens: list[int],
    block_size: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
    spare_blocks: int = 3,
    device: torch.device | str = "cpu",
) -> PagedBatch:
    """Random K/V in a cache whose blocks are handed out in shuffled order (never contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in context_lens]
    width = max([*needed, 1])
    num_blocks = sum(needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    used = 0
    for row, n in enumerate(needed):
        tables[row, :n] = order[used : used + n].int()
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0) if query_lens else cu[1:]
    q = torch.randn(int(cu[-1]), kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return PagedBatch(*(t.to(device) for t in (k_cache, v_cache, tables, lens, cu, q)))
