"""Value checks are remembered per step, but never trusted after a tensor changes."""

from __future__ import annotations

import pytest
import torch
from tusk.kernels.validate import KernelInputError

from tusk import kernels as K


def test_in_place_change_is_rechecked():
    k = torch.randn(3, 2, 8)
    k_cache = torch.zeros(4, 4, 2, 8)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 1, 2])
    K.write_kv_cache(k, k, k_cache, v_cache, slots)
    slots[2] = 99  # same tensor object, now out of range
    with pytest.raises(KernelInputError, match="slots must be -1 or in"):
        K.write_kv_cache(k, k, k_cache, v_cache, slots)


def test_new_tensor_at_a_reused_address_is_rechecked():
    k = torch.randn(2, 2, 8)
    k_cache = torch.zeros(4, 4, 2, 8)
    for _ in range(50):  # fresh tensors often reuse a freed id/address
        K.write_kv_cache(k, k, k_cache, torch.zeros_like(k_cache), torch.tensor([0, 1]))
        with pytest.raises(KernelInputError):
            K.write_kv_cache(k, k, k_cache, torch.zeros_like(k_cache), torch.tensor([0, 16]))
