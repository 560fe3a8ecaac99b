"""model.kernels=liger on a CPU: the PyTorch path runs (Liger is never imported), so a model trained
with Liger on a GPU loads and runs anywhere. The Liger paths themselves are checked against the
PyTorch ones on CUDA in test_gpu_kernels.py."""

import importlib.util
import sys

import pytest
import torch
from model_helpers import seeded, tiny

from common.errors import UserError
from model import kernels
from trainer.objectives.cross_entropy import chunked_linear_cross_entropy


@pytest.mark.parametrize(("mlp", "gelu_tanh"), [("swiglu", False), ("geglu", True)])
def test_liger_falls_back_to_the_pytorch_path_off_cuda(mlp, gelu_tanh):
    ids = torch.randint(1, 64, (2, 16))
    results = {}
    for choice in ("torch", "liger"):
        model = seeded(tiny(kernels=choice, mlp=mlp, gelu_tanh=gelu_tanh))
        logits = model(ids)
        logits.logsumexp(-1).mean().backward()
        results[choice] = logits, {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results["liger"][0], results["torch"][0], rtol=0, atol=0)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["liger"][1][name], grad, rtol=0, atol=0, msg=name)
    hidden, weight = torch.randn(8, 32), torch.randn(64, 32)
    labels = torch.randint(0, 64, (8,))
    assert chunked_linear_cross_entropy(hidden, weight, labels, liger=True) == chunked_linear_cross_entropy(
        hidden, weight, labels)
    assert "liger_kernel" not in sys.modules and kernels.liger.cache_info().currsize == 0


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger_kernel is installed")
def test_a_missing_liger_package_is_one_line():
    with pytest.raises(UserError, match=r"model\.kernels=liger needs the liger-kernel package") as info:
        kernels.liger()
    assert "\n" not in str(info.value)
