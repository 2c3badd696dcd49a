"""Gather/scatter of KV blocks between the worker's [L, 2, N, bs, Hkv, D] cache and the tier."""

from __future__ import annotations

import pytest
import torch
from tusk.kernels import reference as R

from tusk import kernels as K

BACKENDS = ["torch", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
def test_gather_matches_reference_and_layout(backend, dtype):
    kv_cache = (torch.rand(3, 2, 10, 16, 2, 8) * 100).to(dtype)
    ids = torch.tensor([7, 0, 3])
    K.force_backend(backend)
    blocks = K.gather_kv_blocks(kv_cache, ids)
    assert blocks.shape == (3, 3, 2, 16, 2, 8) and blocks.is_contiguous()
    assert torch.equal(blocks, R.gather_kv_blocks(kv_cache, ids))
    assert torch.equal(blocks[0, 2, 1], kv_cache[2, 1, 7])  # [block, layer, K/V]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_round_trips_into_another_cache(backend):
    source = torch.randn(2, 2, 8, 32, 1, 64, dtype=torch.bfloat16)
    target = torch.zeros_like(source)
    K.force_backend(backend)
    blocks = K.gather_kv_blocks(source, torch.tensor([1, 6]))
    K.scatter_kv_blocks(blocks, target, torch.tensor([4, 2]))
    assert torch.equal(target[:, :, 4], source[:, :, 1])
    assert torch.equal(target[:, :, 2], source[:, :, 6])
    untouched = [b for b in range(8) if b not in (4, 2)]
    assert not target[:, :, untouched].any()


def test_empty_and_bad_block_ids():
    kv_cache = torch.zeros(1, 2, 4, 16, 1, 8)
    assert K.gather_kv_blocks(kv_cache, torch.empty(0, dtype=torch.int64)).shape == (0, 1, 2, 16, 1, 8)
    K.scatter_kv_blocks(torch.empty(0, 1, 2, 16, 1, 8), kv_cache, torch.empty(0, dtype=torch.int64))
    with pytest.raises(K.KernelInputError, match=r"gather_kv_blocks.*\[0, 4\)"):
        K.gather_kv_blocks(kv_cache, torch.tensor([4]))
    with pytest.raises(K.KernelInputError, match="blocks must have shape"):
        K.scatter_kv_blocks(torch.zeros(1, 1, 2, 8, 1, 8), kv_cache, torch.tensor([0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_cache_takes_the_general_path(backend):
    storage = torch.randn(2, 2, 6, 16, 1, 16)
    kv_cache = storage[..., :8]  # strided view
    ids = torch.tensor([5, 2])
    hidden_tail = storage[..., 8:].clone()
    K.force_backend(backend)
    blocks = K.gather_kv_blocks(kv_cache, ids)
    assert torch.equal(blocks, R.gather_kv_blocks(kv_cache, ids))
    K.scatter_kv_blocks(blocks * 2, kv_cache, torch.tensor([0, 1]))
    assert torch.equal(kv_cache[:, :, 0], blocks[0].mul(2))
    assert torch.equal(storage[..., 8:], hidden_tail)  # writes stay inside the view
