"""tusk.kernels: portable ops with a reference, a torch backend and a Triton backend.

    from tusk import kernels as K
    y = K.rms_norm(x, weight, 1e-6)

See docs/kernels.md for the registry, dispatch rules and tolerances.
"""

from __future__ import annotations

from tusk.kernels import catalog as _catalog  # noqa: F401  (registers every op)
from tusk.kernels import reference
from tusk.kernels.api import (
    DEBUG_ENV_VAR,
    BoundOps,
    apply_rotary,
    bind,
    debug_enabled,
    fused_add_rms_norm,
    gather_kv_blocks,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rope_cos_sin_cache,
    sample,
    scatter_kv_blocks,
    silu_and_mul,
    write_kv_cache,
)
from tusk.kernels.device import DeviceInfo, detect_device, device_kind
from tusk.kernels.registry import (
    BACKENDS,
    ENV_VAR,
    UnsupportedBackendError,
    describe,
    force_backend,
    forced_backend,
    ops,
    run_backend,
    select_backend,
)
from tusk.kernels.sampling_core import SamplingBatch, mix_seed, reseed_process_generator
from tusk.kernels.validate import KernelInputError

__all__ = [
    "BACKENDS",
    "DEBUG_ENV_VAR",
    "BoundOps",
    "ENV_VAR",
    "DeviceInfo",
    "KernelInputError",
    "SamplingBatch",
    "UnsupportedBackendError",
    "apply_rotary",
    "bind",
    "debug_enabled",
    "describe",
    "detect_device",
    "device_kind",
    "force_backend",
    "forced_backend",
    "fused_add_rms_norm",
    "gather_kv_blocks",
    "mix_seed",
    "ops",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reference",
    "reseed_process_generator",
    "rms_norm",
    "rope_cos_sin_cache",
    "run_backend",
    "sample",
    "scatter_kv_blocks",
    "select_backend",
    "silu_and_mul",
    "write_kv_cache",
]
