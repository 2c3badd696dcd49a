"""The op registry and dispatch: which implementation of an op runs for a given call.

Every op has a reference implementation plus backend implementations that declare the device
kinds, dtypes and shapes they support. Dispatch walks a per-device preference list (Triton first
on GPUs; never Triton on CPU unless forced) and takes the first implementation whose declaration
accepts the call. A forced backend (force_backend() or TUSK_KERNEL_BACKEND) that has an
implementation of the op but cannot run this call is an error naming op, backend and reason;
an op the forced backend does not implement at all falls back to the automatic choice (logged),
so forcing "triton" does not break ops that only exist in torch.

``dispatch`` chooses per call (the module's checked ops); ``bind_op`` makes the same choice once
for a model's ``BoundOps`` (kernels/api.py), which then call the implementation directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Gauge
from tusk.kernels.device import device_kind

from tusk.kernel_backends import KERNEL_BACKENDS

log = logging.getLogger("tusk.kernels")

BACKENDS = KERNEL_BACKENDS  # the names live in a torch-free module (the operator lists them)
ENV_VAR = "TUSK_KERNEL_BACKEND"
ALL_KINDS = frozenset({"cuda", "rocm", "xpu", "mps", "cpu"})
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})

# Automatic preference per device kind. Triton is absent from cpu/mps on purpose.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "torch", "reference"),
    "rocm": ("triton", "torch", "reference"),
    "xpu": ("triton", "torch", "reference"),
    "mps": ("torch", "reference"),
    "cpu": ("torch", "reference"),
}

BACKEND_SELECTED = Gauge(
    "tusk_kernel_backend_selected",
    "1 for the backend dispatch chose for an (op, device, dtype)",
    ["op", "device", "dtype", "backend"],
)
KERNEL_CALLS = Counter(
    "tusk_kernel_calls_total", "Kernel op calls by chosen backend", ["op", "device", "backend"]
)


class UnsupportedBackendError(RuntimeError):
    """A backend was asked to run an op on a device, dtype or shape it does not support."""

    def __init__(self, op: str, backend: str, reason: str) -> None:
        super().__init__(f"tusk.kernels op {op!r}: backend {backend!r} cannot run this call: {reason}")
        self.op, self.backend, self.reason = op, backend, reason


ShapeCheck = Callable[..., "str | None"]


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op and what it declares it supports."""

    backend: str
    fn: Callable
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    shape_check: ShapeCheck | None = None
    available: Callable[[str], str | None] | None = None

    def unsupported_reason(self, kind: str, dtype: torch.dtype, args: tuple) -> str | None:
        if kind not in self.devices:
            return f"device kind {kind!r} not supported (supports {sorted(self.devices)})"
        if dtype not in self.dtypes:
            return f"dtype {dtype} not supported (supports {sorted(str(d) for d in self.dtypes)})"
        if self.available is not None and (reason := self.available(kind)) is not None:
            return reason
        if self.shape_check is not None and (reason := self.shape_check(*args)) is not None:
            return reason
        return None


@dataclass
class Op:
    """An op: its reference, its backend implementations and which argument decides device/dtype."""

    name: str
    key_arg: int
    impls: dict[str, Impl] = field(default_factory=dict)


_OPS: dict[str, Op] = {}
_forced: str | None = None
_seen: set[tuple[str, str, torch.dtype, str]] = set()
_seen_lock = threading.Lock()
_call_counters: dict[tuple[str, str, str], object] = {}


def define_op(name: str, key_arg: int = 0) -> Op:
    op = _OPS.setdefault(name, Op(name, key_arg))
    return op


def register(
    op_name: str,
    backend: str,
    fn: Callable,
    devices: frozenset[str] | set[str] = ALL_KINDS,
    dtypes: frozenset[torch.dtype] | set[torch.dtype] = FLOAT_DTYPES,
    shape_check: ShapeCheck | None = None,
    available: Callable[[str], str | None] | None = None,
) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    _OPS[op_name].impls[backend] = Impl(
        backend, fn, frozenset(devices), frozenset(dtypes), shape_check, available
    )


def ops() -> dict[str, Op]:
    return dict(_OPS)


def force_backend(name: str | None) -> None:
    """Force a backend for every op (None: back to TUSK_KERNEL_BACKEND, then automatic)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS} or None")
    _forced = name


def forced_backend() -> str | None:
    """The backend forced by force_backend(), else by the environment variable, else None."""
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={env!r} is not a kernel backend; choose one of {BACKENDS} or auto")
    return env


def triton_available(kind: str) -> str | None:
    """Why Triton cannot run on this device kind, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton runs on CPU only under TRITON_INTERPRET=1 (the interpreter, for tests)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and not _triton_imported_for_interpreter():
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before the first import"
    return None


def _triton_imported_for_interpreter() -> bool:
    """Triton builds its standard library for the interpreter only if TRITON_INTERPRET=1 at import."""
    if "triton" not in sys.modules:
        return True
    standard = sys.modules.get("triton.language.standard")
    return standard is None or type(standard.sum).__name__ == "InterpretedFunction"


def _choose(op: Op, kind: str, dtype: torch.dtype, args: tuple) -> Impl:
    forced = forced_backend()
    if forced is not None and forced in op.impls:
        impl = op.impls[forced]
        reason = impl.unsupported_reason(kind, dtype, args)
        if reason is not None:
            raise UnsupportedBackendError(op.name, forced, reason)
        return impl
    reasons = []
    for backend in PREFERENCE.get(kind, ("torch", "reference")):
        impl = op.impls.get(backend)
        if impl is None:
            continue
        reason = impl.unsupported_reason(kind, dtype, args)
        if reason is None:
            return impl
        reasons.append(f"{backend}: {reason}")
    raise UnsupportedBackendError(op.name, "auto", "; ".join(reasons) or "no implementation registered")


def _note_choice(op: str, kind: str, dtype: torch.dtype, backend: str) -> None:
    key = (op, kind, dtype, backend)
    if key in _seen:
        return
    with _seen_lock:
        if key in _seen:
            return
        _seen.add(key)
    dtype_name = str(dtype).removeprefix("torch.")
    log.info("kernel op %s on %s/%s runs on backend %s", op, kind, dtype_name, backend)
    BACKEND_SELECTED.labels(op=op, device=kind, dtype=dtype_name, backend=backend).set(1)


def _counter(op_name: str, kind: str, backend: str):
    counter_key = (op_name, kind, backend)
    counter = _call_counters.get(counter_key)
    if counter is None:
        counter = _call_counters.setdefault(
            counter_key, KERNEL_CALLS.labels(op=op_name, device=kind, backend=backend)
        )
    return counter


def dispatch(op_name: str, *args):
    """Run op_name on the backend chosen for these arguments."""
    op = _OPS[op_name]
    key = args[op.key_arg]
    kind = device_kind(key.device)
    impl = _choose(op, kind, key.dtype, args)
    _note_choice(op_name, kind, key.dtype, impl.backend)
    _counter(op_name, kind, impl.backend).inc()
    return impl.fn(*args)


@dataclass(frozen=True)
class Binding:
    """One op bound to one backend for a (device kind, dtype): chosen once, then called directly."""

    op: Op
    impl: Impl
    kind: str
    dtype: torch.dtype

    def check(self, args: tuple) -> None:
        """Debug mode: the call still fits what was bound (device kind, dtype, the backend's checks)."""
        key = args[self.op.key_arg]
        kind = device_kind(key.device)
        if (kind, key.dtype) != (self.kind, self.dtype):
            raise UnsupportedBackendError(
                self.op.name,
                self.impl.backend,
                f"bound for {self.kind}/{self.dtype} but called with {kind}/{key.dtype}",
            )
        reason = self.impl.unsupported_reason(kind, key.dtype, args)
        if reason is not None:
            raise UnsupportedBackendError(self.op.name, self.impl.backend, reason)

    def counted(self, *args):
        """The implementation, counted in tusk_kernel_calls_total (debug mode)."""
        _counter(self.op.name, self.kind, self.impl.backend).inc()
        return self.impl.fn(*args)


def bind_op(op_name: str, args: tuple) -> Binding:
    """Choose op_name's backend for these (first) arguments, as dispatch would, once."""
    op = _OPS[op_name]
    key = args[op.key_arg]
    kind = device_kind(key.device)
    impl = _choose(op, kind, key.dtype, args)
    _note_choice(op_name, kind, key.dtype, impl.backend)
    return Binding(op, impl, kind, key.dtype)


def select_backend(
    op_name: str, device: torch.device | str, dtype: torch.dtype, args: tuple | None = None
) -> str:
    """The backend dispatch would use for op_name on (device, dtype); args add the shape checks."""
    if op_name not in _OPS:
        raise KeyError(f"unknown kernel op {op_name!r}; known: {sorted(_OPS)}")
    op = _OPS[op_name]
    kind = device_kind(torch.device(device))
    if args is None:
        # Without arguments only device/dtype/availability can be judged.
        op = Op(
            op.name,
            op.key_arg,
            {n: Impl(i.backend, i.fn, i.devices, i.dtypes, None, i.available) for n, i in op.impls.items()},
        )
    return _choose(op, kind, dtype, args or ()).backend


def run_backend(op_name: str, backend: str, *args):
    """Run one specific backend (tests, benchmark), with the same support checks as dispatch."""
    op = _OPS[op_name]
    impl = op.impls.get(backend)
    if impl is None:
        raise UnsupportedBackendError(op_name, backend, "backend has no implementation of this op")
    key = args[op.key_arg]
    reason = impl.unsupported_reason(device_kind(key.device), key.dtype, args)
    if reason is not None:
        raise UnsupportedBackendError(op_name, backend, reason)
    return impl.fn(*args)


def describe() -> list[dict]:
    """Every (op, backend) with its declared devices and dtypes, for docs, logs and debugging."""
    rows = []
    for op in _OPS.values():
        for impl in op.impls.values():
            rows.append(
                {
                    "op": op.name,
                    "backend": impl.backend,
                    "devices": sorted(impl.devices),
                    "dtypes": sorted(str(d).removeprefix("torch.") for d in impl.dtypes),
                    "shape_checks": impl.shape_check is not None,
                }
            )
    return rows
