"""Ops bound once per model: same backend and results as dispatch, no per-call checks unless debugging."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY
from tusk.kernels import validate

from tusk import kernels as K


def _norm_args():
    return torch.randn(3, 16), torch.randn(16), 1e-6


def test_bound_ops_match_dispatch_and_pick_its_backend():
    bound = K.bind(debug=False)
    x, w, eps = _norm_args()
    torch.testing.assert_close(bound.rms_norm(x, w, eps), K.rms_norm(x, w, eps), rtol=0, atol=0)
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    cache = K.rope_cos_sin_cache(8, 16, 10000.0, None, torch.float32, "cpu")
    positions = torch.tensor([0, 3, 5, 15])
    for got, want in zip(
        bound.apply_rotary(q, k, positions, cache), K.apply_rotary(q, k, positions, cache), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert bound.backends() == {
        "rms_norm": K.select_backend("rms_norm", "cpu", torch.float32),
        "apply_rotary": K.select_backend("apply_rotary", "cpu", torch.float32),
    }


def test_without_debug_the_arguments_are_not_checked(monkeypatch):
    calls = []
    monkeypatch.setattr(validate, "rms_norm", lambda *a: calls.append(a))
    x, w, eps = _norm_args()
    K.bind(debug=False).rms_norm(x, w, eps)
    assert calls == []
    K.bind(debug=True).rms_norm(x, w, eps)
    K.rms_norm(x, w, eps)  # the module's ops always check
    assert len(calls) == 2


def test_debug_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(K.DEBUG_ENV_VAR, "1")
    assert K.bind().check is True
    monkeypatch.setenv(K.DEBUG_ENV_VAR, "0")
    assert K.bind().check is False
    monkeypatch.delenv(K.DEBUG_ENV_VAR)
    assert K.bind().check is False


def test_the_backend_is_chosen_once_at_the_first_call():
    K.force_backend("reference")
    bound = K.bind(debug=False)
    x, w, eps = _norm_args()
    bound.rms_norm(x, w, eps)
    K.force_backend(None)  # a later change does not rebind a model's ops
    bound.rms_norm(x, w, eps)
    assert bound.backends() == {"rms_norm": "reference"}
    assert K.bind(debug=False).backends() == {}


def test_debug_mode_refuses_a_call_that_does_not_fit_the_binding_and_counts_calls():
    bound = K.bind(debug=True)
    x, w, eps = _norm_args()
    labels = {"op": "rms_norm", "device": "cpu", "backend": "torch"}
    before = REGISTRY.get_sample_value("tusk_kernel_calls_total", labels) or 0.0
    bound.rms_norm(x, w, eps)
    bound.rms_norm(x, w, eps)
    assert REGISTRY.get_sample_value("tusk_kernel_calls_total", labels) == before + 2
    with pytest.raises(
        K.UnsupportedBackendError, match="bound for cpu/torch.float32 but called with cpu/torch.float64"
    ):
        bound.rms_norm(x.double(), w.double(), eps)


def test_bound_empty_batches_skip_the_backend():
    bound = K.bind(debug=False)
    out = bound.silu_and_mul(torch.zeros(0, 8))
    assert out.shape == (0, 4)
    assert bound.backends() == {}
