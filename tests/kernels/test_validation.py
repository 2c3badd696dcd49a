"""Bad input is a clear error naming the op, never a silent wrong result.

Every check runs through both front-ends: the module's ops (validated always) and a model's
bound ops in debug mode (``TUSK_KERNEL_DEBUG=1``), which must reject the same input the same way.
"""

from __future__ import annotations

import pytest
import torch

from tusk import kernels as K


@pytest.fixture(params=["checked", "bound-debug"])
def ops(request: pytest.FixtureRequest):
    return K if request.param == "checked" else K.bind(debug=True)


def _decode_args(**overrides):
    args = {
        "q": torch.zeros(2, 4, 64),
        "k_cache": torch.zeros(4, 16, 2, 64),
        "v_cache": torch.zeros(4, 16, 2, 64),
        "context_lens": torch.tensor([5, 16], dtype=torch.int32),
        "block_tables": torch.tensor([[0], [1]], dtype=torch.int32),
        "scale": 0.1,
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"q": torch.zeros(2, 3, 64)}, "multiple of KV heads"),
        ({"q": torch.zeros(2, 4, 32)}, "head dim"),
        ({"context_lens": torch.tensor([5, 17], dtype=torch.int32)}, "needs 2 blocks"),
        ({"context_lens": torch.tensor([0, 3], dtype=torch.int32)}, "context_lens >= 1"),
        ({"block_tables": torch.tensor([[0], [9]], dtype=torch.int32)}, "block 9"),
        ({"block_tables": torch.tensor([[0.0], [1.0]])}, "int32 or int64"),
        ({"v_cache": torch.zeros(4, 16, 1, 64)}, "same shape"),
        ({"q": torch.zeros(3, 4, 64)}, "3 sequences"),
    ],
)
def test_decode_rejects(ops, overrides, message):
    with pytest.raises(K.KernelInputError, match=message) as info:
        ops.paged_decode_attention(**_decode_args(**overrides))
    assert "paged_decode_attention" in str(info.value)


def test_prefill_rejects_inconsistent_lengths(ops):
    base = _decode_args()
    del base["context_lens"], base["q"]
    with pytest.raises(K.KernelInputError, match="shorter than their query chunk"):
        ops.paged_prefill_attention(
            torch.zeros(10, 4, 64), cu_seqlens_q=torch.tensor([0, 8, 10], dtype=torch.int32),
            context_lens=torch.tensor([5, 2], dtype=torch.int32), **base,
        )  # fmt: skip
    with pytest.raises(K.KernelInputError, match="from 0 to T=10"):
        ops.paged_prefill_attention(
            torch.zeros(10, 4, 64), cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32),
            context_lens=torch.tensor([5, 6], dtype=torch.int32), **base,
        )  # fmt: skip
    with pytest.raises(K.KernelInputError, match="B\\+1"):
        ops.paged_prefill_attention(
            torch.zeros(10, 4, 64), cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32),
            context_lens=torch.tensor([5, 6], dtype=torch.int32), **base,
        )  # fmt: skip


def test_elementwise_rejects(ops):
    with pytest.raises(K.KernelInputError, match="rms_norm.*weight size"):
        ops.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(K.KernelInputError, match="fused_add_rms_norm.*same shape"):
        ops.fused_add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(K.KernelInputError, match="silu_and_mul.*even"):
        ops.silu_and_mul(torch.zeros(2, 7))
    cache = K.rope_cos_sin_cache(8, 4, 10000.0, None, torch.float32, "cpu")
    with pytest.raises(K.KernelInputError, match=r"apply_rotary.*\[0, 4\)"):
        ops.apply_rotary(torch.zeros(1, 2, 8), torch.zeros(1, 1, 8), torch.tensor([4]), cache)
    with pytest.raises(K.KernelInputError, match="write_kv_cache.*slots"):
        kc = torch.zeros(2, 4, 1, 8)
        ops.write_kv_cache(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), kc, kc.clone(), torch.tensor([8]))
    with pytest.raises(ValueError, match="even"):
        K.rope_cos_sin_cache(7, 4, 10000.0, None, torch.float32, "cpu")


def test_prefill_max_q_len_must_match(ops):
    base = _decode_args()
    del base["context_lens"], base["q"]
    args = dict(
        q=torch.zeros(10, 4, 64), cu_seqlens_q=torch.tensor([0, 8, 10], dtype=torch.int32),
        context_lens=torch.tensor([8, 16], dtype=torch.int32), **base,
    )  # fmt: skip
    with pytest.raises(K.KernelInputError, match="max_q_len 7 differs from the longest query chunk 8"):
        ops.paged_prefill_attention(**args, max_q_len=7)
    assert ops.paged_prefill_attention(**args, max_q_len=8).shape == (10, 4, 64)
