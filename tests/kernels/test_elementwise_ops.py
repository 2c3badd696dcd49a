"""Norms, rotary, SiLU-and-mul and KV cache writes: every backend x dtype against the reference."""

from __future__ import annotations

import pytest
import torch
from kernelkit import DTYPES, assert_close
from tusk.kernels import reference as R

from tusk import kernels as K


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 96), (1, 128)])
def test_rms_norm(backend, device, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    w = torch.randn(shape[-1], generator=gen).to(device, dtype)
    K.force_backend(backend)
    assert_close(K.rms_norm(x, w, 1e-5), R.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(backend, device, dtype):
    gen = torch.Generator().manual_seed(2)
    x, residual = (torch.randn(5, 64, generator=gen).to(device, dtype) for _ in range(2))
    w = torch.randn(64, generator=gen).to(device, dtype)
    K.force_backend(backend)
    normed, residual_out = K.fused_add_rms_norm(x, residual, w, 1e-6)
    ref_normed, ref_residual = R.fused_add_rms_norm(x, residual, w, 1e-6)
    assert_close(residual_out, ref_residual)
    assert_close(normed, ref_normed)
    # the contract: residual_out = x + residual, normed = rms_norm(residual_out)
    assert_close(residual_out, (x.float() + residual.float()).to(dtype))
    assert_close(normed, R.rms_norm(residual_out, w, 1e-6))


def test_rms_norm_reference_matches_definition():
    x = torch.tensor([[3.0, 4.0]])
    # mean square = 12.5 -> x / sqrt(12.5)
    expected = torch.tensor([[3.0, 4.0]]) / 12.5**0.5 * torch.tensor([2.0, 1.0])
    torch.testing.assert_close(R.rms_norm(x, torch.tensor([2.0, 1.0]), 0.0), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(backend, device, dtype):
    x = torch.randn(6, 2 * 80, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    K.force_backend(backend)
    out = K.silu_and_mul(x)
    assert out.shape == (6, 80)
    assert_close(out, R.silu_and_mul(x))
    xf = x.float()
    assert_close(out, (xf[:, :80] * torch.sigmoid(xf[:, :80]) * xf[:, 80:]).to(dtype))


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "rope_scaling",
    [None, {"rope_type": "default"}, {"type": "linear", "factor": 4.0}, LLAMA3],
    ids=["none", "default", "linear", "llama3"],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_cache_matches_transformers(rope_scaling, head_dim):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_scaling = None
    if rope_scaling is not None:
        hf_scaling = {"rope_type" if k == "type" else k: v for k, v in rope_scaling.items()}
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_theta=500000.0,
        rope_scaling=hf_scaling,
    )
    positions = torch.arange(300)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 300, head_dim), positions)
    cache = K.rope_cos_sin_cache(head_dim, 300, 500000.0, rope_scaling, torch.float32, "cpu")
    assert cache.shape == (300, head_dim)
    half = head_dim // 2
    torch.testing.assert_close(cache[:, :half], cos[0, :, :half], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache[:, half:], sin[0, :, :half], atol=1e-6, rtol=1e-6)


def test_rope_cache_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="yarn"):
        K.rope_cos_sin_cache(64, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0}, torch.float32, "cpu")


def _hf_rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (64, 8)])
def test_apply_rotary(backend, device, dtype, is_neox, head_dim, group):
    gen = torch.Generator().manual_seed(4)
    kv_heads = 2
    cache = K.rope_cos_sin_cache(head_dim, 64, 10000.0, LLAMA3, dtype, device)
    positions = torch.tensor([0, 5, 17, 63, 31], device=device)
    q = torch.randn(5, kv_heads * group, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(5, kv_heads, head_dim, generator=gen).to(device, dtype)
    K.force_backend(backend)
    q_out, k_out = K.apply_rotary(q, k, positions, cache, is_neox)
    q_ref, k_ref = R.apply_rotary(q, k, positions, cache, is_neox)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


def test_rotary_reference_matches_hf_formula():
    """neox style is HF's q*cos + rotate_half(q)*sin; gpt-j style is the same on de-interleaved dims."""
    cache = K.rope_cos_sin_cache(8, 16, 10000.0, None, torch.float32, "cpu")
    positions = torch.tensor([3, 9])
    q = torch.randn(2, 3, 8)
    cos = torch.cat([cache[positions, :4]] * 2, dim=-1)[:, None]
    sin = torch.cat([cache[positions, 4:]] * 2, dim=-1)[:, None]
    q_out, _ = R.apply_rotary(q, q[:, :1], positions, cache, True)
    torch.testing.assert_close(q_out, q * cos + _hf_rotate_half(q) * sin)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    q_gptj, _ = R.apply_rotary(q, q[:, :1], positions, cache, False)
    torch.testing.assert_close(q_gptj[..., perm], (q[..., perm] * cos + _hf_rotate_half(q[..., perm]) * sin))


def test_partial_rotary_leaves_tail_untouched(backend):
    cache = K.rope_cos_sin_cache(32, 16, 10000.0, None, torch.float32, "cpu")
    q = torch.randn(3, 2, 64)
    K.force_backend(backend)
    q_out, _ = K.apply_rotary(q, q[:, :1].clone(), torch.tensor([1, 2, 3]), cache)
    assert torch.equal(q_out[..., 32:], q[..., 32:])
    assert_close(q_out, R.apply_rotary(q, q[:, :1], torch.tensor([1, 2, 3]), cache)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_cache_into_worker_layout(backend, device, dtype, block_size):
    """The worker passes kv_cache[l, 0] / kv_cache[l, 1] of one [L, 2, N, bs, Hkv, D] tensor."""
    gen = torch.Generator().manual_seed(5)
    kv_cache = torch.randn(2, 2, 6, block_size, 2, 64, generator=gen).to(device, dtype)
    expected = kv_cache.clone()
    slots = torch.tensor(
        [0, block_size - 1, block_size, -1, 5 * block_size + 3, 2 * block_size], device=device
    )
    k = torch.randn(6, 2, 64, generator=gen).to(device, dtype)
    v = torch.randn(6, 2, 64, generator=gen).to(device, dtype)
    R.write_kv_cache(k, v, expected[1, 0], expected[1, 1], slots)
    K.force_backend(backend)
    K.write_kv_cache(k, v, kv_cache[1, 0], kv_cache[1, 1], slots)
    assert torch.equal(kv_cache, expected)
    assert torch.equal(kv_cache[1, 0, 5, 3], k[4])  # slot = block * bs + offset
    assert torch.equal(kv_cache[1, 1, 1, 0], v[2])


@pytest.mark.parametrize("op_call", ["rms_norm", "silu", "rotary", "write"])
def test_empty_batches(backend, op_call):
    K.force_backend(backend)
    if op_call == "rms_norm":
        assert K.rms_norm(torch.empty(0, 64), torch.ones(64), 1e-6).shape == (0, 64)
        normed, res = K.fused_add_rms_norm(torch.empty(0, 64), torch.empty(0, 64), torch.ones(64), 1e-6)
        assert normed.shape == res.shape == (0, 64)
    elif op_call == "silu":
        assert K.silu_and_mul(torch.empty(0, 64)).shape == (0, 32)
    elif op_call == "rotary":
        cache = K.rope_cos_sin_cache(64, 8, 10000.0, None, torch.float32, "cpu")
        q, k = K.apply_rotary(
            torch.empty(0, 4, 64), torch.empty(0, 2, 64), torch.empty(0, dtype=torch.int64), cache
        )
        assert q.shape == (0, 4, 64) and k.shape == (0, 2, 64)
    else:
        cache = torch.zeros(2, 16, 2, 64)
        K.write_kv_cache(
            torch.empty(0, 2, 64),
            torch.empty(0, 2, 64),
            cache,
            cache.clone(),
            torch.empty(0, dtype=torch.int64),
        )
        assert not cache.any()
