"""Kernel tests run Triton through its CPU interpreter unless a GPU is present.

Triton decides at import time whether its standard library is interpreted, so TRITON_INTERPRET
must be set before anything imports triton: that is why it is set here, at collection time.
"""

import os

import pytest
import torch


def _gpu_present() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tusk.kernels.registry import triton_available  # noqa: E402

from tusk import kernels as K  # noqa: E402


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch: pytest.MonkeyPatch):
    """Every test starts with automatic dispatch, whatever the caller's environment says."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    K.force_backend(None)
    yield
    K.force_backend(None)


def _skip_unless_triton_runs() -> None:
    pytest.importorskip("triton")
    reason = triton_available("cuda" if _gpu_present() else "cpu")
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    """A backend under test; Triton runs through its interpreter on CPU."""
    if request.param == "triton":
        _skip_unless_triton_runs()
    return request.param


@pytest.fixture
def triton_ready() -> None:
    """Skip unless Triton kernels can run here (natively on a GPU, else interpreted)."""
    _skip_unless_triton_runs()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
