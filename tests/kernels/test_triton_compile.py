"""The Triton kernels compile for real GPU targets, within each one's shared memory, checked offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tusk.kernels import triton_backend as tb
from tusk.kernels.device import shared_memory_limit

pytest.importorskip("triton")


def test_kernels_compile_for_sm90_and_fit_each_targets_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = [r for r in results if not r["ok"]]
    assert not failures, failures
    assert {r["kernel"] for r in results} >= {
        "paged_decode_kernel",
        "paged_prefill_kernel",
        "rms_norm_kernel",
    }
    # fits the 228 KiB of shared memory an H100 SM offers
    assert all(r["shared_bytes"] <= 228 * 1024 for r in results)
    # fp32 attention, the largest config allowed on each target, within that target's limit
    limited = {(r["target"], r["kernel"]) for r in results if "limit" in r}
    assert limited == {
        (t, k) for t in ("gfx942", "sm_89", "sm_90") for k in ("paged_decode_kernel", "paged_prefill_kernel")
    }
    assert all(r["shared_bytes"] <= r["limit"] for r in results if "limit" in r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_configs_are_chosen_per_target_from_its_limit(dtype, head_dim):
    f32 = dtype == torch.float32
    for target in ("gfx942", "sm_89", "sm_90"):
        limit = shared_memory_limit(target)
        prefill = tb.prefill_candidates(dtype, head_dim, target, limit, f32)
        decode = tb.decode_candidates(dtype, 4, head_dim, target, limit, [1, 2], 2, f32)
        d = max(16, head_dim)
        assert prefill and all(
            tb.attention_shared_bytes(c["BLOCK_M"], c["BLOCK_N"], d, dtype, target, f32) <= limit
            for c in prefill
        )
        assert decode and all(
            tb.attention_shared_bytes(16, c["BLOCK_N"], d, dtype, target, f32) <= limit for c in decode
        )
        assert decode[0]["splits"] == 2  # the heuristic split count stays first


def test_the_configs_that_overflowed_are_gone_where_they_overflowed():
    def first(target, dtype):
        return tb.prefill_candidates(dtype, 128, target, shared_memory_limit(target), dtype == torch.float32)[
            0
        ]

    big = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    assert first("sm_90", torch.float32) == big  # 227 KiB: the preferred tile fits
    assert first("sm_89", torch.float32) != big  # 115 KB compiled > 99 KiB
    assert first("gfx942", torch.float32) != big  # 80 KB compiled > 64 KiB
    assert first("gfx942", torch.bfloat16) == big  # 16 KB compiled: bf16 keeps it on MI300X
    decode = tb.decode_candidates(torch.float32, 4, 128, "gfx942", 65536, [4], 4, True)
    assert all(c["BLOCK_N"] <= 32 for c in decode)  # BLOCK_N 64 compiled to 68 KiB of LDS
