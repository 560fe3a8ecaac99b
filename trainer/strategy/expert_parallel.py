"""Expert parallel (``parallel.ep`` > 1, with train.strategy=ddp): each MoE layer's experts are split
over the ``ep`` ranks of a (dp, ep) mesh; everything else is replicated on every rank.

Every rank reads its own data, as under DDP. In an MoE layer a rank sends each token assignment
to the rank holding its expert (an all-to-all within the ep group), runs its own experts on what it
receives, and sends the outputs back (all-to-all; both differentiable). Gradients are summed after
the last micro-batch: replicated tensors over the world, an expert shard over its dp replicas, each
divided by the world size, which is what DDP's average gives for a replicated model. Checkpoints
and ``full_state_dict`` hold whole experts (gathered within the ep group), named as in the plain
model, so a checkpoint resumes under ddp, fsdp or another ep.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh

from common.errors import ConfigError
from model.moe import Experts, moe_layers, run_experts
from trainer.strategy.optim import set_lr
from trainer.strategy.single import TRAINED, Single


class ShardedExperts(nn.Module):
    """This rank's ``n_experts / ep`` experts of an :class:`~model.moe.Experts`, with its interface:
    rows sorted by (global) expert in, their outputs in the same order out."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group, self.ep = group, dist.get_world_size(group)
        self.n_experts = experts.up.shape[0]
        self.n_local = self.n_experts // self.ep
        start = dist.get_rank(group) * self.n_local
        self.up = nn.Parameter(experts.up.detach()[start:start + self.n_local].clone())
        self.down = nn.Parameter(experts.down.detach()[start:start + self.n_local].clone())
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
        return dist_fn.all_to_all_single(x.new_empty(x.shape), back, send, receive, group=self.group)


class ExpertParallel(Single):
    def __init__(self, cfg, env, accumulation: int = 1, ep: int = 2) -> None:
        super().__init__(cfg, env, accumulation)
        self.ep = ep

    def parallelize(self, model: nn.Module) -> nn.Module:
        layers = moe_layers(model)
        if self.env.world_size % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide the {self.env.world_size} ranks")
        if not layers or layers[0].n_experts % self.ep:
            experts = layers[0].n_experts if layers else 0
            raise ConfigError(f"parallel.ep={self.ep} shards the experts: the model's n_experts={experts} "
                              "must be a positive multiple of it")
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size // self.ep, self.ep),
                                mesh_dim_names=("dp", "ep"))
        self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        for layer in layers:
            layer.experts = ShardedExperts(layer.experts, self.ep_group)
        self.sharded = {id(p) for m in model.modules() if isinstance(m, ShardedExperts) for p in m.parameters()}
        return model

    def step(self, lr: float, skip: bool = False) -> float:
        self._reduce_gradients()
        trained = [p for p in self.model.parameters() if p.requires_grad]
        replicated = sum(p.grad.double().pow(2).sum() for p in trained if id(p) not in self.sharded)
        shards = torch.stack([p.grad.double().pow(2).sum() for p in trained if id(p) in self.sharded]).sum()
        dist.all_reduce(shards, group=self.ep_group)
        norm = float((replicated + shards).sqrt())
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        if math.isfinite(norm) and norm > limit:  # as clip_grad_norm_
            torch._foreach_mul_([p.grad for p in trained], limit / (norm + 1e-6))
        if not skip and math.isfinite(norm):
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def weight_norm(self) -> float:
        """The whole model's weight norm (each tensor once, experts gathered over the ep group)."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        replicated = sum(p.double().pow(2).sum() for p in trained if id(p) not in self.sharded)
        shards = torch.stack([p.double().pow(2).sum() for p in trained if id(p) in self.sharded]).sum()
        dist.all_reduce(shards, group=self.ep_group)
        return float((replicated + shards).sqrt())

    def _reduce_gradients(self) -> None:
        world = self.env.world_size
        for sharded in (False, True):
            params = [p for p in self.model.parameters() if p.requires_grad and (id(p) in self.sharded) == sharded]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat, group=self.dp_group if sharded else None)
            flat /= world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    # -- checkpoints: whole experts, named as in the plain model ---------------------------------

    def _shard_names(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if id(p) in self.sharded}

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(self.ep)]
        dist.all_gather(parts, local.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def _local(self, full: torch.Tensor) -> torch.Tensor:
        return full.chunk(self.ep)[dist.get_rank(self.ep_group)]

    def _whole_state(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=TRAINED)
        for name in self._shard_names():  # new dicts: the per-parameter ones are the optimizer's own
            model_state[name] = self._gather(model_state[name])
            optim_state["state"][name] = {key: self._gather(value) if value.ndim else value  # step is a scalar
                                          for key, value in optim_state["state"][name].items()}
        return {"model": model_state, "optim": optim_state}

    def save(self, path: Path) -> None:
        dcp.save(self._whole_state(), checkpoint_id=path / "dcp")

    def load(self, path: Path) -> None:
        state = self._whole_state()  # the shapes to read into
        dcp.load(state, checkpoint_id=path / "dcp")
        for name in self._shard_names():
            state["model"][name] = self._local(state["model"][name])
            state["optim"]["state"][name] = {key: self._local(value) if value.ndim else value
                                             for key, value in state["optim"]["state"][name].items()}
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=TRAINED)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        shards = self._shard_names()
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        state = {}
        for name, tensor in self.model.state_dict().items():
            if name in frozen:  # a LoRA run's base, as ignore_frozen_params leaves it out
                continue
            if name in shards:
                tensor = self._gather(tensor.detach())
            state[name] = tensor.detach().cpu().clone()
        return state if self.env.is_main else None
