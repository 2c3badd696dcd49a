"""Optional ``torch.compile`` of the model's dense per-layer math (``EngineConfig.torch_compile``).

Attention reads the paged cache with host-side bookkeeping (lengths as lists, per-sequence
loops), which would break or respecialize a compiled graph every step; the MLP does not. So the
compiled region is the MLP of every layer: gate/up projection, SiLU-and-mul, down projection,
with the token count dynamic. The weights are arguments, so one graph serves every layer and
every batch size. Inductor fuses the activation into one pass and calls the same matmul
kernels as eager, so greedy output stays token-identical (tests/worker/test_torch_compile.py).

Meant for CPU, where it was measured; other devices work but are untested here. Compilation
happens on the first steps (seconds to a minute); ``TORCHINDUCTOR_CACHE_DIR`` keeps the result
for later processes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("tusk.worker.compiled")

_HALF = (torch.float16, torch.bfloat16)


def _mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Same math as LlamaModel._mlp with the torch backend's silu_and_mul (fp32 for half dtypes)."""
    h = F.linear(x, gate_up, gate_up_bias)
    inter = h.shape[-1] // 2
    if h.dtype in _HALF:
        hf = h.float()
        act = (F.silu(hf[..., :inter]) * hf[..., inter:]).to(h.dtype)
    else:
        act = F.silu(h[..., :inter]) * h[..., inter:]
    return F.linear(act, down, down_bias)


def compile_model(model) -> bool:
    """Route ``model``'s MLPs through one compiled function; False (model unchanged) if it cannot."""
    if model.spec.hidden_act != "silu":
        log.warning("torch_compile: only SiLU MLPs are compiled; %s runs eagerly", model.spec.hidden_act)
        return False
    compiled = torch.compile(_mlp, dynamic=True, fullgraph=True)

    def mlp(layer, x: torch.Tensor) -> torch.Tensor:
        return compiled(x, layer.gate_up, layer.gate_up_bias, layer.down, layer.down_bias)

    model._mlp = mlp  # instance attribute: shadows the eager method of this model only
    log.info("torch_compile: MLPs of %d layers compiled (dynamic token count)", len(model.layers))
    return True
