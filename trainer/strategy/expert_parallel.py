"""Expert parallel (``parallel.ep`` > 1, with train.strategy ddp or fsdp): each MoE layer's experts are
split over the ``ep`` ranks of a (dp, ep) mesh; everything else is replicated on every rank.

Every rank reads its own data, as under DDP. In an MoE layer a rank sends each token assignment
to the rank holding its expert (an all-to-all within the ep group), runs its own experts on what it
receives, and sends the outputs back (all-to-all; both differentiable). An expert's gradient then
already holds the contributions of every token of its ep group: summed over its dp replicas, it is
divided by the world size like a replicated tensor's. Gradient sync, norms and checkpoints (each
rank's experts, as blocks of the whole tensors): :mod:`trainer.strategy.partitioned`.

With ``train.strategy=fsdp`` (torchtitan's dp2ep ``apply_fsdp``, models/llama4/infra/parallelize.py
at 1e8f9acd1): each layer's experts are sharded by FSDP2 over the dp ranks holding the same experts,
every other tensor over all ranks. An expert's gradient is then divided by the world size, not by dp:
torchtitan sets FSDP2's gradient divide factor, which needs PREMUL_SUM (gloo has none), so
:meth:`~trainer.strategy.partitioned.Partitioned.step` divides by the remaining ep instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.fsdp import fully_shard

from common.errors import ConfigError
from model.moe import Experts, moe_layers, run_experts
from trainer.config import ParallelConfig
from trainer.distributed import device_mesh
from trainer.strategy.fsdp import fsdp_options, shard_model
from trainer.strategy.partitioned import Partitioned


class ShardedExperts(nn.Module):
    """This rank's ``n_experts / ep`` experts of an :class:`~model.moe.Experts`, with its interface:
    rows sorted by (global) expert in, their outputs in the same order out."""

    def __init__(self, experts: Experts, strategy: Partitioned) -> None:
        super().__init__()
        self.group, self.ep = strategy.shard_group, strategy.size
        self.n_local = experts.up.shape[0] // self.ep
        indices = list(torch.arange(experts.up.shape[0]).split(self.n_local))
        self.up = strategy.split(experts.up, 0, indices)
        self.down = strategy.split(experts.down, 0, indices)
        self.act, self.gated = experts.act, experts.gated

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        sent_counts = torch.tensor(counts, dtype=torch.int64).view(self.ep, self.n_local)
        got_counts = torch.empty_like(sent_counts)  # [source rank, local expert]
        dist.all_to_all_single(got_counts, sent_counts, group=self.group)
        send, receive = sent_counts.sum(1).tolist(), got_counts.sum(1).tolist()
        got = dist_fn.all_to_all_single(x.new_empty(sum(receive), x.shape[1]), x, receive, send, group=self.group)
        # rows arrive by source rank, then expert; the experts want them by expert, then source
        expert_of_row = torch.arange(self.n_local).repeat(self.ep).repeat_interleave(got_counts.flatten())
        order = expert_of_row.argsort(stable=True)
        out = run_experts(got[order], got_counts.sum(0).tolist(), self.up, self.down, self.act, self.gated)
        back = torch.empty_like(out).index_copy(0, order, out)
        return dist_fn.all_to_all_single(back.new_empty(x.shape[0], back.shape[1]), back, send, receive,
                                         group=self.group)


class ExpertParallel(Partitioned):
    mesh_dims = ("dp", "ep")

    def __init__(self, cfg, env, accumulation: int = 1, size: int = 2) -> None:
        super().__init__(cfg, env, accumulation, size)
        self.sharded = str(cfg.strategy) == "fsdp"

    @property
    def shard_divisor(self) -> int:
        return self.env.world_size

    def partition(self, model: nn.Module) -> None:
        layers = moe_layers(model)
        if self.env.world_size % self.size:
            raise ConfigError(f"parallel.ep={self.size} does not divide the {self.env.world_size} ranks")
        ParallelConfig(ep=self.size).check_model(model.config)  # refused at load already; a guard
        self.make_mesh()
        for layer in layers:
            layer.experts = ShardedExperts(layer.experts, self)

    def shard(self, model: nn.Module) -> nn.Module:
        """Experts over the dp sub-mesh (nested first), then the blocks and the root over every rank."""
        options = fsdp_options(self.cfg, self.env.device)
        for layer in moe_layers(model):
            fully_shard(layer.experts, mesh=self.mesh["dp"], **options)
        self.whole_group = None  # the world
        return shard_model(model, device_mesh(self.env.device.type, (self.env.world_size,)), self.cfg,
                           self.env.device)
