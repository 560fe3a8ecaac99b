"""Throughput, MFU and memory of a step: the numbers logged beside the loss."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from trainer.distributed import all_reduce

# dense bf16 peak FLOP/s per device (no sparsity), by a substring of the CUDA device name
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: configured, else looked up for known GPUs; None when unknown (CPUs)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class MetricSums:
    """The loss and metrics of an objective's micro-batches, summed, until :meth:`reduce` makes them
    means over every rank: metrics per loss unit, ratios by their own denominators (the training
    step and :mod:`trainer.evaluation` both sum this way)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, out: Any) -> None:
        for name, value in {"loss": out.loss_sum, **out.metrics}.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().double()
        for name, (numerator, denominator) in out.ratios.items():
            before = self.ratios.get(name, (0, 0))
            self.ratios[name] = (before[0] + numerator.detach().double(), before[1] + denominator.detach().double())

    def reduce(self, count: torch.Tensor) -> dict[str, float]:
        """All-reduce over ranks and divide by ``count``, the loss units of every rank (reduced already)."""
        names, ratio_names = sorted(self.sums), sorted(self.ratios)  # the same order on every rank
        parts = [self.sums[n] for n in names] + [t for n in ratio_names for t in self.ratios[n]]
        totals = all_reduce(torch.stack(parts).to(count.device)).tolist()
        units = max(count.item(), 1)
        out = {name: total / units for name, total in zip(names, totals)}
        at = len(names)
        for k, name in enumerate(ratio_names):
            out[name] = totals[at + 2 * k] / max(totals[at + 2 * k + 1], 1)
        return out
