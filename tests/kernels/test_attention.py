"""Paged decode and prefill attention: every backend x dtype against the reference, plus the
reference itself against SDPA on contiguous KV (so the reference is checked independently)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernelkit import DTYPES, assert_close, paged_batch
from tusk.kernels import reference as R
from tusk.kernels import triton_backend

from tusk import kernels as K

# (head_dim, GQA group, block size); Triton under the interpreter gets the zipped subset.
FULL_GRID = [(d, g, bs) for d in (64, 128) for g in (1, 4, 8) for bs in (16, 32)]
SMALL_GRID = [(64, 1, 16), (128, 4, 32), (64, 8, 32)]


def _scale(dim: int) -> float:
    return dim**-0.5


def _cases(grid_name: str):
    grid = FULL_GRID if grid_name == "full" else SMALL_GRID
    return [pytest.param(*case, id=f"d{case[0]}-g{case[1]}-bs{case[2]}") for case in grid]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group,block_size", _cases("full"))
def test_decode_torch(device, dtype, head_dim, group, block_size):
    lens = [1, block_size, 2 * block_size, 37, 3 * block_size + 5, 200]
    _check_decode("torch", dtype, head_dim, group, block_size, lens, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group,block_size", _cases("small"))
def test_decode_triton(triton_ready, device, dtype, head_dim, group, block_size):
    _check_decode("triton", dtype, head_dim, group, block_size, [1, block_size, 37], device)


@pytest.mark.parametrize("splits", [2, 3])
def test_decode_triton_split_context(triton_ready, device, splits, monkeypatch):
    monkeypatch.setattr(triton_backend, "FORCED_DECODE_SPLITS", splits)
    _check_decode("triton", torch.float32, 64, 4, 16, [1, 16, 70], device)


def _check_decode(backend, dtype, head_dim, group, block_size, lens, device):
    batch = paged_batch(lens, [1] * len(lens), block_size, 2, group, head_dim, dtype, device=device)
    K.force_backend(backend)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.context_lens, batch.block_tables, _scale(head_dim))
    out = K.paged_decode_attention(*args)
    assert_close(out, R.paged_decode_attention(*args))


def _prefill_lens(block_size: int, small: bool):
    """(context lens, query lens): fresh prompts, cached prefixes on and off block boundaries."""
    if small:
        return [1, block_size, 20], [1, block_size, 7]
    return (
        [1, block_size, 2 * block_size, 2 * block_size + 9, 40, 3 * block_size],
        [1, block_size, block_size, 9, 40, 1],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group,block_size", _cases("full"))
def test_prefill_torch(device, dtype, head_dim, group, block_size):
    _check_prefill("torch", device, dtype, head_dim, group, block_size, *_prefill_lens(block_size, False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group,block_size", _cases("small"))
def test_prefill_triton(triton_ready, device, dtype, head_dim, group, block_size):
    _check_prefill("triton", device, dtype, head_dim, group, block_size, *_prefill_lens(block_size, True))


def _check_prefill(backend, device, dtype, head_dim, group, block_size, context_lens, query_lens):
    kv_heads = 1 if group == 8 else 2
    batch = paged_batch(
        context_lens, query_lens, block_size, kv_heads, group, head_dim, dtype, seed=7, device=device
    )
    K.force_backend(backend)
    args = (
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.cu_seqlens_q,
        batch.context_lens,
        batch.block_tables,
        _scale(head_dim),
    )
    assert_close(K.paged_prefill_attention(*args), R.paged_prefill_attention(*args))


def _contiguous_kv(batch, row: int, length: int):
    block_size = batch.k_cache.shape[1]
    blocks = batch.block_tables[row, : -(-length // block_size)].long()
    keys = batch.k_cache[blocks].flatten(0, 1)[:length]
    values = batch.v_cache[blocks].flatten(0, 1)[:length]
    return keys, values


def test_reference_prefill_equals_causal_sdpa_on_contiguous_kv():
    batch = paged_batch([20, 33], [20, 33], 16, 2, 4, 64, torch.float64, seed=3)
    out = R.paged_prefill_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.cu_seqlens_q,
        batch.context_lens,
        batch.block_tables,
        0.125,
    )
    for row, (start, end) in enumerate([(0, 20), (20, 53)]):
        keys, values = _contiguous_kv(batch, row, end - start)
        expected = F.scaled_dot_product_attention(
            batch.q[start:end].transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            is_causal=True,
            scale=0.125,
            enable_gqa=True,
        )[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected)


def test_chunked_prefill_equals_one_shot_prefill():
    """A prompt prefilled in two chunks (prefix cached) attends exactly like one full prefill."""
    full = paged_batch([45], [45], 16, 2, 4, 64, torch.float64, seed=5)
    args = (full.k_cache, full.v_cache)
    one_shot = R.paged_prefill_attention(
        full.q, *args, full.cu_seqlens_q, full.context_lens, full.block_tables, 0.1
    )
    second_chunk = R.paged_prefill_attention(
        full.q[30:],
        *args,
        torch.tensor([0, 15], dtype=torch.int32),
        full.context_lens,
        full.block_tables,
        0.1,
    )
    torch.testing.assert_close(second_chunk, one_shot[30:])
    K.force_backend("torch")
    torch_chunk = K.paged_prefill_attention(
        full.q[30:],
        *args,
        torch.tensor([0, 15], dtype=torch.int32),
        full.context_lens,
        full.block_tables,
        0.1,
    )
    torch.testing.assert_close(torch_chunk, one_shot[30:])


def test_reference_decode_equals_last_row_of_prefill():
    batch = paged_batch([37, 16], [37, 16], 16, 2, 4, 64, torch.float64, seed=9)
    prefill = R.paged_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.context_lens, batch.block_tables, 0.2
    )
    last_rows = batch.q[[36, 52]]
    decode = R.paged_decode_attention(
        last_rows, batch.k_cache, batch.v_cache, batch.context_lens, batch.block_tables, 0.2
    )
    torch.testing.assert_close(decode, prefill[[36, 52]])


def test_engine_flow_write_then_attend(backend):
    """write_kv_cache for a chunk, then prefill over cached prefix + chunk, as the worker does."""
    torch.manual_seed(0)
    kv_cache = torch.zeros(2, 2, 8, 16, 2, 64)
    layer = 1
    tables = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    keys, values = torch.randn(40, 2, 64), torch.randn(40, 2, 64)
    slots = torch.tensor([int(tables[0, p // 16]) * 16 + p % 16 for p in range(40)])
    K.force_backend(backend)
    K.write_kv_cache(keys[:25], values[:25], kv_cache[layer, 0], kv_cache[layer, 1], slots[:25])
    K.write_kv_cache(keys[25:], values[25:], kv_cache[layer, 0], kv_cache[layer, 1], slots[25:])
    q = torch.randn(15, 8, 64)
    out = K.paged_prefill_attention(
        q, kv_cache[layer, 0], kv_cache[layer, 1], torch.tensor([0, 15], dtype=torch.int32),
        torch.tensor([40], dtype=torch.int32), tables, 0.125,
    )  # fmt: skip
    mask = torch.arange(40)[None, :] <= torch.arange(25, 40)[:, None]
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        attn_mask=mask, scale=0.125, enable_gqa=True,
    )[0].transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_empty_batches(backend):
    K.force_backend(backend)
    k_cache = torch.zeros(4, 16, 2, 64)
    out = K.paged_decode_attention(
        torch.empty(0, 4, 64), k_cache, k_cache, torch.empty(0, dtype=torch.int32),
        torch.empty(0, 2, dtype=torch.int32), 0.1,
    )  # fmt: skip
    assert out.shape == (0, 4, 64)
    out = K.paged_prefill_attention(
        torch.empty(0, 4, 64), k_cache, k_cache, torch.zeros(1, dtype=torch.int32),
        torch.empty(0, dtype=torch.int32), torch.empty(0, 2, dtype=torch.int32), 0.1,
    )  # fmt: skip
    assert out.shape == (0, 4, 64)


def test_prefill_sequence_with_no_new_queries_in_batch(backend):
    """A zero-length chunk inside a batch is skipped, and its neighbours are still right."""
    batch = paged_batch([16, 5, 9], [3, 0, 9], 16, 2, 1, 64, torch.float32, seed=11)
    K.force_backend(backend)
    args = (
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.cu_seqlens_q,
        batch.context_lens,
        batch.block_tables,
        0.1,
    )
    assert_close(K.paged_prefill_attention(*args), R.paged_prefill_attention(*args))


@pytest.mark.parametrize("chunk_bytes", [1, 40_000])
def test_torch_decode_cpu_chunking(monkeypatch, chunk_bytes):
    """Rows split across many length-sorted chunks (one row each, or a few) give the same result."""
    from tusk.kernels import torch_backend

    monkeypatch.setattr(torch_backend, "CPU_DECODE_CHUNK_BYTES", chunk_bytes)
    lens = [40, 1, 16, 90, 33, 16, 64]
    batch = paged_batch(lens, [1] * len(lens), 16, 2, 4, 64, torch.float32, seed=13)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.context_lens, batch.block_tables, 0.125)
    assert_close(torch_backend.paged_decode_attention(*args), R.paged_decode_attention(*args))


def test_layer_flow_with_views_from_a_fused_qkv_projection(backend, device):
    """The worker splits one qkv projection: q, k, v are strided views, never contiguous copies."""
    gen = torch.Generator().manual_seed(21)
    heads, kv_heads, dim, tokens, block_size = 4, 2, 64, 19, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(device)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (
        q.reshape(tokens, heads, dim),
        k.reshape(tokens, kv_heads, dim),
        v.reshape(tokens, kv_heads, dim),
    )
    assert not q.is_contiguous() and not v.is_contiguous()
    cache = K.rope_cos_sin_cache(dim, 64, 10000.0, None, torch.float32, device)
    positions = torch.arange(tokens, device=device)
    tables = torch.tensor([[3, 1]], dtype=torch.int32, device=device)
    slots = torch.tensor(
        [int(tables[0, p // block_size]) * block_size + p % block_size for p in range(tokens)], device=device
    )
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    lens = torch.tensor([tokens], dtype=torch.int32, device=device)

    def layer(run_backend: str):
        K.force_backend(run_backend)
        kv_cache = torch.zeros(1, 2, 4, block_size, kv_heads, dim, device=device)
        q_rot, k_rot = K.apply_rotary(q, k, positions, cache)
        K.write_kv_cache(k_rot, v, kv_cache[0, 0], kv_cache[0, 1], slots)
        prefill = K.paged_prefill_attention(
            q_rot, kv_cache[0, 0], kv_cache[0, 1], cu, lens, tables, dim**-0.5
        )
        decode = K.paged_decode_attention(q_rot[-1:], kv_cache[0, 0], kv_cache[0, 1], lens, tables, dim**-0.5)
        return q_rot, kv_cache, prefill, decode

    for got, want in zip(layer(backend), layer("reference"), strict=True):
        assert_close(got, want)


def test_triton_prefill_with_a_host_max_q_len_reads_no_device_values(triton_ready, device, monkeypatch):
    """The model passes the longest chunk from the host: the launch must not read cu_seqlens back."""
    from tusk.kernels import triton_backend

    batch = paged_batch([1, 16, 20], [1, 16, 7], 16, 2, 2, 32, torch.float32, seed=3, device=device)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.context_lens,
            batch.block_tables, _scale(32))  # fmt: skip
    want = R.paged_prefill_attention(*args)
    reads = []
    real_max = torch.Tensor.max

    def counting_max(self, *a, **kw):  # the wrapper's only way to learn the longest chunk
        reads.append(self.shape)
        return real_max(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "max", counting_max)
    assert_close(triton_backend.paged_prefill_attention(*args, 16), want)
    assert reads == []
    assert_close(triton_backend.paged_prefill_attention(*args), want)
    assert reads  # without the hint it still works, at the price of the sync
