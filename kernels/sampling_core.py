"""Per-row randomness for sampling, independent of batch composition.

A seeded row draws its single uniform number from a generator seeded by a stable mix of
(seed, step). The token is then a deterministic function of (logits, parameters, seed, step), so a
prefill worker and a decode worker (or two batch layouts, or two backends) pick the same token.
Sampling is inverse-CDF over the filtered distribution in vocabulary order, which needs one
random number per row instead of one per vocabulary entry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row sampling parameters. top_k 0, top_p 0 or >= 1 and min_p 0 (or no min_p tensor)
    mean disabled; temperature 0 = greedy. min_p (vLLM's) drops tokens whose probability after
    temperature is below min_p times the most likely token's, before top-k and top-p."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seeds: list[int | None]
    steps: list[int]
    min_p: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.temperature.shape[0]
        lengths = {
            "top_p": self.top_p.shape[0],
            "top_k": self.top_k.shape[0],
            "seeds": len(self.seeds),
            "steps": len(self.steps),
        }
        if self.min_p is not None:
            lengths["min_p"] = self.min_p.shape[0]
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"SamplingBatch: temperature has {n} rows but {wrong}")


_process_generator = torch.Generator()
_process_generator.seed()


def mix_seed(seed: int, step: int) -> int:
    """A stable 63-bit generator seed for (seed, step); no Python hash(), same on every machine."""
    digest = hashlib.blake2b(f"tusk-sample:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_uniform(seed: int, step: int) -> float:
    """U[0, 1) for (seed, step), straight from the mixed 63-bit seed (53 bits of it): no torch
    generator is built per seeded row and step, which cost about 15 us a row."""
    return (mix_seed(seed, step) >> 10) * 2.0**-53


def row_uniform(batch: SamplingBatch, row: int) -> float:
    """U[0, 1) for one row: from (seed, step) when seeded, else the process-wide generator."""
    seed = batch.seeds[row]
    if seed is None:
        return float(torch.rand(1, generator=_process_generator, dtype=torch.float64))
    return seeded_uniform(int(seed), int(batch.steps[row]))


def batch_uniforms(batch: SamplingBatch, rows: list[int]) -> list[float]:
    """``row_uniform`` for several rows, with one draw from the process generator for all the
    unseeded ones (seeded rows do not depend on it, so their tokens are unchanged)."""
    unseeded = [r for r in rows if batch.seeds[r] is None]
    drawn = iter(torch.rand(len(unseeded), generator=_process_generator, dtype=torch.float64).tolist())
    return [
        next(drawn) if batch.seeds[r] is None else seeded_uniform(int(batch.seeds[r]), int(batch.steps[r]))
        for r in rows
    ]


def reseed_process_generator(seed: int) -> None:
    """Make unseeded rows reproducible within a process (EngineConfig.seed)."""
    _process_generator.manual_seed(seed)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Zero the probabilities below ``min_p * max(probs)`` per row (rows with min_p 0 unchanged)."""
    if min_p is None:
        return probs
    min_p = min_p.to(device=probs.device, dtype=probs.dtype)
    if not bool((min_p > 0).any()):
        return probs
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.reshape(-1, 1)
    return torch.where(probs >= threshold, probs, torch.zeros_like(probs))


def cdf_dtype(device: torch.device) -> torch.dtype:
    """Precision of the sampling CDF: float64 where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64
