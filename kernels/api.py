"""The public ops: validate arguments, then run the chosen backend.

Every op has one front-end (here): argument checks, the empty-batch shortcut, then the backend
call. Two kinds of instance share it:

- ``CheckedOps``: the module-level ``tusk.kernels.rms_norm`` & co. Every call is validated and
  dispatched (backend chosen per call): right for tests, tools and ad-hoc use.
- ``BoundOps`` (``tusk.kernels.bind()``): what a model holds. Each op's backend is chosen once, on
  its first call, and then called directly; arguments are validated (and calls counted) only in
  debug mode (``TUSK_KERNEL_DEBUG=1`` or ``bind(debug=True)``). Per-call dispatch and checks
  were about 8% of a decode step on CPU, more on a GPU where the kernels themselves are fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from tusk.kernels import reference, registry, validate
from tusk.kernels.sampling_core import SamplingBatch

DEBUG_ENV_VAR = "TUSK_KERNEL_DEBUG"


def debug_enabled() -> bool:
    """Whether bound ops validate every call (``TUSK_KERNEL_DEBUG`` = 1/true/yes/on)."""
    return os.environ.get(DEBUG_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


class KernelOps:
    """The op front-ends; subclasses decide how ``_run`` reaches a backend and whether to validate."""

    check: bool = True

    def _run(self, op: str, *args):
        raise NotImplementedError

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * weight over the last dim, fp32 math, output in x's dtype."""
        if self.check:
            validate.rms_norm("rms_norm", x, weight)
        if x.numel() == 0:
            return torch.empty_like(x)
        return self._run("rms_norm", x, weight, float(eps))

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype before the norm."""
        if self.check:
            validate.rms_norm("fused_add_rms_norm", x, weight)
            validate.same_shape("fused_add_rms_norm", x, residual, "x and residual")
        if x.numel() == 0:
            return torch.empty_like(x), torch.empty_like(x)
        return self._run("fused_add_rms_norm", x, residual, weight, float(eps))

    def apply_rotary(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        is_neox: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k by their tokens' positions; neox (halves) or gpt-j (interleaved) pairing."""
        if self.check:
            validate.apply_rotary("apply_rotary", q, k, positions, cos_sin_cache)
        if q.shape[0] == 0:
            return torch.empty_like(q), torch.empty_like(k)
        return self._run("apply_rotary", q, k, positions, cos_sin_cache, bool(is_neox))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x[..., :I]) * x[..., I:] for x[..., 2I]."""
        if self.check:
            validate.silu_and_mul("silu_and_mul", x)
        if x.numel() == 0:
            return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
        return self._run("silu_and_mul", x)

    def write_kv_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store token t's K/V at slot_mapping[t] = block * block_size + offset; slot -1 skips it."""
        if self.check:
            validate.write_kv_cache("write_kv_cache", k, v, k_cache, v_cache, slot_mapping)
        if k.shape[0] == 0:
            return
        self._run("write_kv_cache", k, v, k_cache, v_cache, slot_mapping)

    def paged_prefill_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
        max_q_len: int | None = None,
    ) -> torch.Tensor:
        """Causal attention for a ragged batch of query chunks over their whole paged context.

        ``max_q_len``: the longest query chunk, when the caller knows it on the host; backends
        that size their launch grid by it (Triton) then need no device sync to read it."""
        if self.check:
            validate.paged_prefill_attention(
                "paged_prefill_attention", q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables
            )
            validate.max_q_len("paged_prefill_attention", cu_seqlens_q, max_q_len)
        if q.shape[0] == 0:
            return torch.empty_like(q)
        return self._run(
            "paged_prefill_attention",
            q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, float(scale), max_q_len,
        )  # fmt: skip

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One query token per sequence (at position context_len - 1) over its paged context."""
        if self.check:
            validate.paged_decode_attention(
                "paged_decode_attention", q, k_cache, v_cache, context_lens, block_tables
            )
        if q.shape[0] == 0:
            return torch.empty_like(q)
        return self._run(
            "paged_decode_attention", q, k_cache, v_cache, context_lens, block_tables, float(scale)
        )

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """One token id per row: greedy, or temperature/top-k/top-p sampling seeded per request."""
        if self.check:
            validate.sample("sample", logits, batch)
        if logits.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=logits.device)
        return self._run("sample", logits, batch)

    def gather_kv_blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """Copy blocks out of the [L, 2, N, bs, Hkv, D] cache into a contiguous [n, L, 2, bs, Hkv, D]."""
        if self.check:
            validate.kv_blocks("gather_kv_blocks", kv_cache, block_ids)
        return self._run("gather_kv_blocks", kv_cache, block_ids)

    def scatter_kv_blocks(
        self, blocks: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> None:
        """Inverse of gather_kv_blocks: write blocks[i] into cache block block_ids[i], in place."""
        if self.check:
            validate.kv_blocks("scatter_kv_blocks", kv_cache, block_ids, blocks)
        if block_ids.shape[0] == 0:
            return
        self._run("scatter_kv_blocks", blocks, kv_cache, block_ids)


class CheckedOps(KernelOps):
    """Validate every call and choose its backend per call."""

    def _run(self, op: str, *args):
        return registry.dispatch(op, *args)


class BoundOps(KernelOps):
    """Ops bound to a backend on their first call; validated only in debug mode.

    The binding follows the first call's arguments (device kind, dtype, the backend's shape
    checks, the forced backend at that moment), so one instance belongs to one model: its later
    calls of an op have the same device and dtype and differ only in sizes. In debug mode every
    call is also checked to still fit the bound backend (same device kind and dtype) and counted
    in ``tusk_kernel_calls_total``.
    """

    def __init__(self, debug: bool | None = None) -> None:
        self.check = debug_enabled() if debug is None else bool(debug)
        self._fns: dict[str, Callable] = {}
        self._bound: dict[str, registry.Binding] = {}

    def _run(self, op: str, *args):
        fn = self._fns.get(op)
        if fn is None:
            binding = self._bound[op] = registry.bind_op(op, args)
            fn = self._fns[op] = binding.counted if self.check else binding.impl.fn
        elif self.check:
            self._bound[op].check(args)
        return fn(*args)

    def backends(self) -> dict[str, str]:
        """op -> backend, for the ops bound so far (logs, tests)."""
        return {op: binding.impl.backend for op, binding in self._bound.items()}


def bind(debug: bool | None = None) -> BoundOps:
    """A fresh set of ops for one model (see ``BoundOps``); debug None = ``TUSK_KERNEL_DEBUG``."""
    return BoundOps(debug)


_checked = CheckedOps()
rms_norm = _checked.rms_norm
fused_add_rms_norm = _checked.fused_add_rms_norm
apply_rotary = _checked.apply_rotary
silu_and_mul = _checked.silu_and_mul
write_kv_cache = _checked.write_kv_cache
paged_prefill_attention = _checked.paged_prefill_attention
paged_decode_attention = _checked.paged_decode_attention
sample = _checked.sample
gather_kv_blocks = _checked.gather_kv_blocks
scatter_kv_blocks = _checked.scatter_kv_blocks


def rope_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """[max_position, head_dim]: cos in the first half, sin in the second (built once, on CPU, in fp32)."""
    return reference.rope_cos_sin_cache(head_dim, max_position, base, rope_scaling, dtype, device)
