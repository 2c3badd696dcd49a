"""Helpers for the KV tier tests: fingerprints, block tensors and metric readings."""

from __future__ import annotations

import torch
from prometheus_client import REGISTRY

from tusk.kvformat import ModelFingerprint

TINY_BLOCK = (4, 2, 16, 2, 32)  # layers, K/V, tokens, kv heads, head dim: the tiny model's


def fingerprint(
    dtype: str = "float32", shape: tuple[int, ...] = TINY_BLOCK, model: str = "m"
) -> ModelFingerprint:
    layers, _, block_size, heads, dim = shape
    return ModelFingerprint(model, dtype, "L2THD", block_size, layers, heads, dim)


def random_block(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
