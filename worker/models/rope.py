"""Rotary position tables for every rope type tusk serves, following transformers' rope initialisers
(``transformers.modeling_rope_utils``) so that positions rotate exactly as in the reference model.

The table holds cos in the first half of each row and sin in the second, already multiplied by the
type's attention factor (yarn and longrope scale cos/sin, as transformers does), so the attention
code is the same for every type.

``freq_factors`` is not a transformers type: it carries the ``rope_freqs`` tensor of a GGUF file
(how llama.cpp stores Llama 3's rope scaling), dividing each default frequency by its factor.

Two types change their frequencies with the sequence length in transformers: ``dynamic`` (NTK,
recomputed when the sequence grows past ``max_position_embeddings``) and ``longrope`` (short
factors up to ``original_max_position_embeddings``, long ones past it). A paged cache needs one
rotation per position, so position ``p`` is rotated with the frequencies transformers uses for a
sequence of ``p + 1`` tokens: identical to transformers for any sequence within the original
length and for token-by-token decoding past it (vLLM makes the same choice for longrope).
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "freq_factors")
_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
    "dynamic": ("factor",),
    "longrope": ("long_factor", "short_factor"),
    "freq_factors": ("factors",),
}


class RopeError(ValueError):
    """A rope configuration tusk cannot reproduce; the message names what is wrong."""


def rope_type(params: dict[str, Any] | None) -> str:
    if not params:
        return "default"
    return str(params.get("rope_type") or params.get("type") or "default")


def check_rope(params: dict[str, Any] | None, head_dim: int) -> None:
    kind = rope_type(params)
    if kind not in ROPE_TYPES:
        raise RopeError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    missing = [key for key in _REQUIRED.get(kind, ()) if (params or {}).get(key) is None]
    if missing:
        raise RopeError(f"rope type {kind!r} needs {', '.join(missing)} in rope_parameters / rope_scaling")
    if kind in ("longrope", "freq_factors"):
        for key in _REQUIRED[kind]:
            if len(params[key]) != head_dim // 2:  # type: ignore[index]
                raise RopeError(f"longrope {key} has {len(params[key])} values, expected {head_dim // 2}")  # type: ignore[index]
    partial = float((params or {}).get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise RopeError(f"partial_rotary_factor {partial} is not supported (only 1.0)")


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _yarn(params: dict[str, Any], base: float, dim: int, max_position_embeddings: int):
    """transformers' ``_compute_yarn_parameters``."""
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _inv_freq_per_position(
    params: dict[str, Any] | None,
    base: float,
    dim: int,
    max_position_embeddings: int,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies, [D/2] or [P, D/2] when they depend on the position, and the cos/sin factor."""
    from tusk.kernels.reference import rope_inv_freq

    kind = rope_type(params)
    if kind in ("default", "linear", "llama3"):
        return rope_inv_freq(dim, base, params if kind != "default" else None), 1.0
    assert params is not None
    if kind == "yarn":
        return _yarn(params, base, dim, max_position_embeddings)
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: theta_i / factor_i
        default = rope_inv_freq(dim, base, None)
        return default / torch.tensor(params["factors"], dtype=torch.float32), 1.0
    if kind == "dynamic":
        factor = float(params["factor"])
        seq_len = torch.clamp(positions + 1, min=max_position_embeddings).double()
        bases = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (bases.float()[:, None] ** _exponents(dim)[None, :])
        return inv, 1.0
    # longrope
    original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
    factor = params.get("factor") or max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base ** _exponents(dim))
    long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base ** _exponents(dim))
    inv = torch.where((positions + 1 > original)[:, None], long[None, :], short[None, :])
    return inv, float(attention_factor)


def cos_sin_cache(
    params: dict[str, Any] | None,
    base: float,
    head_dim: int,
    max_position_embeddings: int,
    num_positions: int,
    device: torch.device | str,
) -> torch.Tensor:
    """[num_positions, head_dim] fp32: cos * factor, then sin * factor, per position."""
    positions = torch.arange(num_positions, dtype=torch.int64)
    inv_freq, factor = _inv_freq_per_position(params, base, head_dim, max_position_embeddings, positions)
    freqs = positions.float()[:, None] * (inv_freq if inv_freq.dim() == 2 else inv_freq[None, :])
    return torch.cat([freqs.cos() * factor, freqs.sin() * factor], dim=-1).to(device)
