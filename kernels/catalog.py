"""Which ops exist and which backends implement them (the registry's contents)."""

from __future__ import annotations

import torch
from tusk.kernels import reference, torch_backend
from tusk.kernels.registry import ALL_KINDS, define_op, register

ALL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})

# op name -> index of the argument whose device and dtype drive dispatch
OP_KEYS = {
    "rms_norm": 0,
    "fused_add_rms_norm": 0,
    "apply_rotary": 0,
    "silu_and_mul": 0,
    "write_kv_cache": 2,
    "paged_prefill_attention": 0,
    "paged_decode_attention": 0,
    "sample": 0,
    "gather_kv_blocks": 0,
    "scatter_kv_blocks": 1,
}

# fp8 / integer KV caches are plain byte copies for the block movers.
_COPY_DTYPES = (
    ALL_DTYPES
    | {torch.uint8, torch.int8}
    | {
        d
        for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
        if d is not None
    }
)


def _register_all() -> None:
    for name, key in OP_KEYS.items():
        define_op(name, key)
        dtypes = _COPY_DTYPES if name in ("gather_kv_blocks", "scatter_kv_blocks") else ALL_DTYPES
        register(name, "reference", getattr(reference, name), ALL_KINDS, dtypes)
        register(name, "torch", getattr(torch_backend, name), ALL_KINDS, dtypes)
    from tusk.kernels import triton_backend

    triton_backend.register_all()


_register_all()
