"""Dispatch: the right backend per device, forcing, clear errors, logs and metrics."""

from __future__ import annotations

import logging

import pytest
import torch
from prometheus_client import REGISTRY
from tusk.kernels import device as device_module
from tusk.kernels import registry

from tusk import kernels as K

GPU_OPS = [
    "rms_norm",
    "fused_add_rms_norm",
    "apply_rotary",
    "silu_and_mul",
    "write_kv_cache",
    "paged_prefill_attention",
    "paged_decode_attention",
]


def test_cpu_picks_torch_even_when_the_interpreter_is_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op in K.ops():
        assert K.select_backend(op, "cpu", torch.float32) == "torch"
        assert K.select_backend(op, "cpu", torch.bfloat16) == "torch"


def test_mps_picks_torch():
    assert K.select_backend("paged_decode_attention", "mps", torch.float16) == "torch"


@pytest.mark.parametrize("hip", [None, "6.2"], ids=["cuda", "rocm"])
def test_gpus_prefer_triton_where_it_has_a_kernel(monkeypatch, hip):
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert K.device_kind(torch.device("cuda")) == ("rocm" if hip else "cuda")
    for op in GPU_OPS:
        assert K.select_backend(op, "cuda", torch.float16) == "triton", op
    for op in ("sample", "gather_kv_blocks", "scatter_kv_blocks"):
        assert K.select_backend(op, "cuda", torch.float16) == "torch", op
    # fp64 is outside Triton's declared dtypes: torch takes it
    assert K.select_backend("rms_norm", "cuda", torch.float64) == "torch"


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    K.force_backend("triton")
    with pytest.raises(K.UnsupportedBackendError) as info:
        K.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    message = str(info.value)
    assert "rms_norm" in message and "triton" in message and "TRITON_INTERPRET" in message
    assert info.value.op == "rms_norm" and info.value.backend == "triton"


def test_forcing_unsupported_dtype_names_op_backend_and_reason(triton_ready):
    K.force_backend("triton")
    with pytest.raises(K.UnsupportedBackendError, match=r"silu_and_mul.*triton.*float64"):
        K.silu_and_mul(torch.ones(2, 8, dtype=torch.float64))


def test_forcing_unsupported_shape_names_the_reason(triton_ready):
    K.force_backend("triton")
    q = torch.zeros(1, 2, 512)
    cache = torch.zeros(2, 16, 2, 512)
    with pytest.raises(K.UnsupportedBackendError, match=r"paged_decode_attention.*triton.*head dim 512"):
        K.paged_decode_attention(
            q, cache, cache, torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32), 1.0
        )
    with pytest.raises(K.UnsupportedBackendError, match="differs from KV cache dtype"):
        K.paged_decode_attention(
            torch.zeros(1, 2, 64), cache[..., :64].half().contiguous(), cache[..., :64].half().contiguous(),
            torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32), 1.0,
        )  # fmt: skip


def test_forced_backend_without_the_op_falls_back(triton_ready):
    K.force_backend("triton")
    logits = torch.randn(2, 10)
    batch = K.SamplingBatch(
        torch.zeros(2), torch.ones(2), torch.zeros(2, dtype=torch.int32), [None, None], [0, 0]
    )
    assert K.sample(logits, batch).tolist() == logits.argmax(-1).tolist()


def test_env_var_forces_and_function_overrides_it(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "reference")
    assert K.forced_backend() == "reference"
    assert K.select_backend("rms_norm", "cpu", torch.float32) == "reference"
    K.force_backend("torch")
    assert K.select_backend("rms_norm", "cpu", torch.float32) == "torch"
    K.force_backend(None)
    assert K.forced_backend() == "reference"
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.forced_backend() is None


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="cutlass"):
        K.force_backend("cutlass")
    monkeypatch.setenv(K.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match="TUSK_KERNEL_BACKEND"):
        K.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6)


def test_engine_config_setting_is_a_valid_backend_name():
    from tusk.config import EngineConfig

    K.force_backend(EngineConfig(kernel_backend="reference").kernel_backend)
    assert K.forced_backend() == "reference"


def test_choice_is_logged_once_and_exported_as_metrics(caplog, monkeypatch):
    monkeypatch.setattr(registry, "_seen", set())
    K.force_backend("reference")
    x = torch.ones(3, 16, dtype=torch.float64)
    labels = {"op": "rms_norm", "device": "cpu", "backend": "reference"}
    before = REGISTRY.get_sample_value("tusk_kernel_calls_total", labels) or 0.0
    with caplog.at_level(logging.INFO, logger="tusk.kernels"):
        K.rms_norm(x, torch.ones(16, dtype=torch.float64), 1e-6)
        K.rms_norm(x, torch.ones(16, dtype=torch.float64), 1e-6)
    choices = [r for r in caplog.records if "runs on backend" in r.getMessage()]
    assert len(choices) == 1
    assert "rms_norm" in choices[0].getMessage() and "reference" in choices[0].getMessage()
    selected = REGISTRY.get_sample_value("tusk_kernel_backend_selected", {**labels, "dtype": "float64"})
    assert selected == 1.0
    assert REGISTRY.get_sample_value("tusk_kernel_calls_total", labels) == before + 2


def test_run_backend_checks_support():
    with pytest.raises(K.UnsupportedBackendError, match="no implementation"):
        K.run_backend("sample", "triton", torch.zeros(1, 2), None)


def test_detect_device_cpu_and_known_parts():
    info = K.detect_device("cpu")
    assert info.kind == "cpu" and info.device == torch.device("cpu") and info.supports_bf16
    assert device_module._known_part("NVIDIA H100 80GB HBM3") == (3350.0, 989.0)
    assert device_module._known_part("NVIDIA A100-SXM4-80GB")[0] == 2039.0
    assert device_module._known_part("AMD Instinct MI300X")[0] == 5300.0
    assert device_module._known_part("Some Future Part") == (None, None)
    assert K.detect_device().kind in device_module.KINDS


def test_describe_lists_every_op_and_backend():
    rows = K.describe()
    assert {r["op"] for r in rows} == set(K.ops())
    triton_rows = {r["op"] for r in rows if r["backend"] == "triton"}
    assert triton_rows == set(GPU_OPS)
    assert all("cpu" in r["devices"] for r in rows if r["backend"] == "torch")


def test_no_backend_for_the_dtype_is_a_clear_error():
    with pytest.raises(
        K.UnsupportedBackendError, match=r"silu_and_mul.*torch: dtype torch.int64 not supported"
    ):
        K.silu_and_mul(torch.ones(2, 8, dtype=torch.int64))
