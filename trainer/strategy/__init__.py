"""Strategies hide the parallelism: each wraps a plain ``nn.Module`` and owns its optimizer.

The loop only talks to this interface: ``wrap`` once, then per step ``forward_backward`` over the
step's micro-batches (by default ``accumulate(last)`` around each one's forward and ``backward``;
a pipeline runs them through its schedule), then ``step(lr, skip)``; ``save``/``load`` for
checkpoints in the strategy's own sharded format, and ``full_state_dict`` for export.

| name   | module            | what it is                                                      |
|--------|-------------------|-----------------------------------------------------------------|
| single | single.py         | one process, plain AdamW                                        |
| ddp    | ddp.py            | DistributedDataParallel                                         |
| fsdp   | fsdp.py           | FSDP2 ``fully_shard`` per block (+ HSDP, bf16 policy, offload)  |
| zero*  | deepspeed.py      | DeepSpeed ZeRO stage 1/2/3 (+ CPU offload, user ds_config)      |
| ddp + parallel.ep > 1 | expert_parallel.py | MoE experts sharded over ep ranks, the rest replicated (partitioned.py) |
| ddp + parallel.tp > 1 | tensor_parallel.py | attention heads and MLP units split over tp ranks (partitioned.py) |
| ddp + parallel.pp > 1 | pipeline_parallel.py | a decoder's blocks cut into stages over pp ranks (torch pipelining) |
| fsdp + parallel.tp > 1 | tensor_parallel.py, fsdp.py | the same, the tp-split blocks sharded by FSDP2 over dp |
| fsdp + parallel.ep > 1 | expert_parallel.py, fsdp.py | experts sharded by FSDP2 over dp, the rest over every rank |
| + parallel.sequence_parallel | tensor_parallel.py | tp's norms, residuals, dropout on sequence slices (Megatron-SP) |
| ddp/fsdp + parallel.cp > 1 | context_parallel.py | each sequence split over cp ranks, k/v all-gathered for attention |

Shared pieces: optim.py (AdamW, decay groups), prepare.py (activation checkpointing and
torch.compile per block), ds_config.py (the DeepSpeed config, generated or the user's, checked).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from trainer.config import ParallelConfig, TrainConfig
    from trainer.distributed import DistEnv
    from trainer.metrics import MetricSums
    from trainer.objectives import Batch, LossOutput, Objective


class Strategy(abc.ABC):
    """One way to run data-parallel training; subclasses are small."""

    # The on-disk format of ``save``: strategies sharing one can resume each other's checkpoints.
    checkpoint_format = "dcp"

    def __init__(self, cfg: TrainConfig, env: DistEnv, accumulation: int = 1) -> None:
        self.cfg = cfg
        self.env = env
        self.accumulation = accumulation  # micro-batches per optimizer step on each rank
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @abc.abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Place, shard and wrap ``model``; build its optimizer; return the module to call."""

    @abc.abstractmethod
    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """Place (and shard, where the strategy shards) a model that is never trained. Like
        :meth:`wrap`, it takes a loaded model or one on the meta device (see :func:`materialize`)."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self, lr: float, skip: bool = False) -> float:
        """Clip, apply the update at ``lr`` unless ``skip``, clear gradients; return the grad norm."""

    @abc.abstractmethod
    def save(self, path: Path) -> None:
        """Write model + optimizer state under ``path`` (every rank calls it); frozen parameters (a LoRA
        run's base) are not written: the run rebuilds them from model.init."""

    @abc.abstractmethod
    def load(self, path: Path) -> None: ...

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's trained weights on CPU on rank 0 (None elsewhere): all of them, but the frozen
        base of a LoRA run (its adapters alone); every rank calls it."""

    def forward_backward(self, micro_batches: Sequence[Batch], scale: float,
                         loss: Callable[[Batch], tuple[LossOutput, torch.Tensor | float]],
                         objective: Objective) -> MetricSums:
        """Forward and backward every micro-batch of a step, back-propagating ``loss``'s (objective,
        extra) sums times ``scale``; the loss outputs summed (the objective is for strategies that
        run its pieces themselves)."""
        from trainer.distributed import to_device
        from trainer.metrics import MetricSums

        sums = MetricSums()
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, self.env.device)
            with self.accumulate(last=i == len(micro_batches) - 1):
                with self.autocast():
                    out, extra = loss(batch)
                self.backward((out.loss_sum + extra) * scale)
            sums.add(out)
        return sums

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward+backward; ``last`` marks the one that syncs gradients."""
        yield

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes (bf16 autocast where the strategy does not cast itself)."""
        return contextlib.nullcontext()

    # ranks that read the same batch (tensor parallel's tp group); the loader splits data over the rest
    data_copies = 1

    @property
    def data_rank(self) -> int:
        return self.env.rank // self.data_copies

    @property
    def data_world(self) -> int:
        return self.env.world_size // self.data_copies

    def local_weights(self) -> Iterator[torch.Tensor]:
        """This rank's part of every trainable weight (a DTensor's local shard)."""
        for param in self.model.parameters():
            if param.requires_grad:
                yield param.to_local() if hasattr(param, "to_local") else param

    @torch.no_grad()
    def weight_norm(self) -> float:
        """The L2 norm of the trainable weights over all ranks (every rank calls it). A tensor replicated
        on several ranks counts once per copy: the same factor for every tensor, so ratios of norms hold."""
        from trainer.distributed import all_reduce

        squares = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for tensor in self.local_weights():
            squares += tensor.detach().double().pow(2).sum().to(squares.device)
        return float(all_reduce(squares).sqrt())


def materialize(model: nn.Module, seed: int, on_block: Callable[[nn.Module], None] | None = None) -> bool:
    """Give a model built on the meta device (a fresh run's) its weights on the host, initialised from
    ``seed``, calling ``on_block`` as each block is ready; whether it was on the meta device."""
    if not any(p.is_meta for p in model.parameters()):
        return False
    model.materialize("cpu", seed, on_block)
    return True


# strategy name → (module under trainer.strategy, class); imported on use (deepspeed is heavy)
STRATEGIES = {"single": ("single", "Single"), "ddp": ("ddp", "DDP"), "fsdp": ("fsdp", "FSDP"),
              "zero1": ("deepspeed", "DeepSpeed"), "zero2": ("deepspeed", "DeepSpeed"),
              "zero3": ("deepspeed", "DeepSpeed")}


def build_strategy(cfg: TrainConfig, env: DistEnv, accumulation: int = 1,
                   parallel: ParallelConfig | None = None, seq_len: int = 0) -> Strategy:
    """The strategy of ``cfg.strategy``; with ``parallel.ep``, ``parallel.tp``, ``parallel.pp`` or
    ``parallel.cp`` > 1 (config-checked: one of them; pp with ddp, the others with ddp or fsdp),
    expert, tensor, pipeline or context parallel. ``seq_len``: data.seq_len, the width of pp's micro-batches."""
    if parallel is not None and parallel.ep > 1:
        from trainer.strategy.expert_parallel import ExpertParallel

        return ExpertParallel(cfg, env, accumulation, size=parallel.ep)
    if parallel is not None and parallel.tp > 1:
        from trainer.strategy.tensor_parallel import TensorParallel

        return TensorParallel(cfg, env, accumulation, size=parallel.tp, sequence_parallel=parallel.sequence_parallel,
                              vocab_parallel=parallel.vocab_parallel)
    if parallel is not None and parallel.pp > 1:
        from trainer.strategy.pipeline_parallel import PipelineParallel

        return PipelineParallel(cfg, env, accumulation, size=parallel.pp, schedule=parallel.pp_schedule,
                                seq_len=seq_len)
    if parallel is not None and parallel.cp > 1:
        from trainer.strategy import context_parallel

        return context_parallel.build(cfg, env, accumulation, size=parallel.cp)
    module, name = STRATEGIES[str(cfg.strategy)]
    return getattr(importlib.import_module(f"trainer.strategy.{module}"), name)(cfg, env, accumulation)


def needs_process_group(name: str) -> bool:
    """Every strategy but ``single`` talks through a process group, even with one rank."""
    return name != "single"
