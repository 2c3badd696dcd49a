"""The names of the tusk.kernels backends, in a module that does not import torch.

``tusk.kernels.registry`` dispatches on these names; the operator's CRD lists them as the enum of
``engine.kernelBackend`` and must stay importable without torch, so the list lives here, once.
"""

from __future__ import annotations

KERNEL_BACKENDS: tuple[str, ...] = ("triton", "torch", "reference")
