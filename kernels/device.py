"""Device detection: which accelerator family a tensor lives on and what it can do.

Dispatch needs a *kind* (cuda, rocm, xpu, mps, cpu) rather than torch's device type, because
ROCm reports itself as "cuda" and Triton kernels written for CUDA also run on ROCm and XPU.
Bandwidth and peak numbers come from a small table of known parts, so the benchmark can report
percent-of-peak; unknown parts report None instead of a guess.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KINDS = ("cuda", "rocm", "xpu", "mps", "cpu")

# name substring -> (memory bandwidth GB/s, dense bf16 TFLOP/s); vendor datasheet numbers.
_KNOWN_PARTS: dict[str, tuple[float, float]] = {
    "H200": (4800.0, 989.0),
    "H100 PCIe": (2000.0, 756.0),
    "H100": (3350.0, 989.0),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100 80GB PCIe": (1935.0, 312.0),
    "A100": (1555.0, 312.0),
    "L40S": (864.0, 362.0),
    "L4": (300.0, 121.0),
    "A10G": (600.0, 70.0),
    "MI300X": (5300.0, 1307.0),
    "MI300A": (5300.0, 980.0),
    "MI250X": (3277.0, 383.0),
    "Max 1550": (3277.0, 838.0),
}


# Shared memory (NVIDIA) / LDS (AMD) one kernel block may use, in bytes, by compile target: the
# opt-in maximum per block. Triton launch configs must fit it (kernels/triton_backend.py).
SHARED_MEMORY_LIMITS: dict[str, int] = {
    "sm_80": 166912,  # A100
    "sm_86": 101376,  # RTX 30xx, A10/A40
    "sm_87": 166912,  # Jetson Orin
    "sm_89": 101376,  # L4, L40S, RTX 40xx (the ~99 KiB of consumer parts)
    "sm_90": 232448,  # H100, H200
    "sm_100": 232448,  # B200
    "sm_120": 101376,  # RTX 50xx
    "gfx90a": 65536,  # MI210/MI250X
    "gfx942": 65536,  # MI300X/MI300A/MI325X: 64 KiB LDS
    "gfx950": 163840,  # MI350/MI355X: 160 KiB LDS
}
# Unknown targets (new parts, Intel XPU) get the smallest limit of the table.
DEFAULT_SHARED_MEMORY = 65536


def shared_memory_limit(target: str | None) -> int:
    """The per-block shared memory of a compile target name ("sm_90", "gfx942", ...)."""
    return SHARED_MEMORY_LIMITS.get(target or "", DEFAULT_SHARED_MEMORY)


@dataclass(frozen=True)
class DeviceInfo:
    """What dispatch and the benchmark need to know about one device."""

    kind: str
    device: torch.device
    name: str
    capability: tuple[int, int] | None
    supports_bf16: bool
    memory_bandwidth_gbs: float | None
    peak_bf16_tflops: float | None
    target: str | None = None  # compile target: "sm_90", "gfx942"; None on CPU/MPS/XPU
    shared_memory_bytes: int | None = None  # per block, what Triton configs must fit


def device_kind(device: torch.device | str) -> str:
    """Accelerator family of a device; cheap enough to call on every kernel dispatch."""
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if dev_type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    if dev_type in KINDS:
        return dev_type
    return dev_type


def _known_part(name: str) -> tuple[float | None, float | None]:
    for key, numbers in _KNOWN_PARTS.items():
        if key.lower() in name.lower():
            return numbers
    return None, None


def default_device() -> torch.device:
    """The best accelerator this process can see, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", 0)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=32)
def _detect(device: torch.device) -> DeviceInfo:
    kind = device_kind(device)
    if kind in ("cuda", "rocm"):
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name = props.name
        capability = (props.major, props.minor)
        bf16 = torch.cuda.is_bf16_supported()
        bandwidth, peak = _known_part(name if kind == "cuda" else getattr(props, "gcnArchName", name) + name)
        if kind == "cuda":
            target = f"sm_{props.major}{props.minor}"
            shared = getattr(props, "shared_memory_per_block_optin", None) or shared_memory_limit(target)
        else:
            target = str(getattr(props, "gcnArchName", "")).split(":")[0] or None
            shared = shared_memory_limit(target)
        return DeviceInfo(
            kind, torch.device("cuda", index), name, capability, bf16, bandwidth, peak, target, int(shared)
        )
    if kind == "xpu":
        index = device.index or 0
        name = torch.xpu.get_device_name(index)
        bandwidth, peak = _known_part(name)
        return DeviceInfo(
            kind, torch.device("xpu", index), name, None, True, bandwidth, peak, None, DEFAULT_SHARED_MEMORY
        )
    if kind == "mps":
        return DeviceInfo(kind, torch.device("mps"), "Apple MPS", None, True, None, None)
    import platform

    name = platform.processor() or platform.machine() or "cpu"
    return DeviceInfo("cpu", torch.device("cpu"), name, None, True, None, None)


def detect_device(device: torch.device | str | None = None) -> DeviceInfo:
    """Describe `device` (default: the best available one)."""
    if device is None:
        device = default_device()
    return _detect(torch.device(device))
