"""Kernel choice for the elementwise parts of a block (``model.kernels``).

``torch`` (the default) is plain PyTorch: the reference, on every device, fused by ``torch.compile``
when ``train.compile`` is on. ``liger`` runs Liger-Kernel's Triton kernels for what they cover —
RMSNorm, SwiGLU, GeGLU with tanh GELU, RoPE and the linear + cross-entropy — on CUDA tensors,
and the PyTorch path everywhere else (CPU tensors, LayerNorm, plain GELU, score biases), so a model
trained with ``liger`` loads and runs unchanged on a laptop. The GPU tests check each Liger path
against the PyTorch one (tests/model/test_gpu_kernels.py).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from common.errors import UserError


@functools.cache
def liger() -> ModuleType:
    """``liger_kernel.transformers.functional``, imported on first use on a CUDA tensor."""
    try:
        from liger_kernel.transformers import functional
    except ImportError as exc:
        raise UserError(f"model.kernels=liger needs the liger-kernel package ({exc}); "
                        "pip install liger-kernel, or set model.kernels=torch") from exc
    return functional


def use_liger(enabled: bool, x: torch.Tensor) -> bool:
    return enabled and x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's casting: statistics in fp32, normalised values cast back to x's dtype, then scaled."""
    return liger().liger_rms_norm(x, weight, eps, 0.0, "llama", False)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return liger().liger_swiglu(gate, up)


def geglu_tanh(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return liger().liger_geglu(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T, D], k [B, Hkv, T, D], cos/sin [B|1, 1, T, D] (half-split layout)."""
    return liger().liger_rope(q, k, cos, sin)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """Summed CE of ``hidden [N, D] @ weight.T (+ bias)`` against ``labels [N]`` (-100 ignored)."""
    return liger().liger_fused_linear_cross_entropy(hidden, weight, labels, bias, reduction="sum")
