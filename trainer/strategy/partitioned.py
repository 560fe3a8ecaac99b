"""The shared part of expert and tensor parallel: some parameters split over a group of ranks (the
"shard group"), the rest replicated, on a 2-D (dp, shard) mesh of plain tensors (no DTensor).

Gradients are summed after the last micro-batch: replicated ones over the world, divided by the
world size (what DDP's average gives); split ones over their dp replicas, divided by
:attr:`shard_divisor`. The gradient norm counts each tensor once. Checkpoints and
``full_state_dict`` hold whole tensors, gathered over the shard group, under the plain model's
names and layout, so a checkpoint resumes under ddp, fsdp or another mesh.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh

from trainer.strategy.optim import set_lr
from trainer.strategy.single import TRAINED, Single


class Partitioned(Single):
    mesh_dims = ("dp", "shard")

    def __init__(self, cfg, env, accumulation: int = 1, size: int = 2) -> None:
        super().__init__(cfg, env, accumulation)
        self.size = size  # ranks in one shard group
        self.parts: dict[int, tuple[int, list[torch.Tensor]]] = {}  # id(param) -> (dim, each rank's indices)

    def make_mesh(self) -> None:
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size // self.size, self.size),
                                mesh_dim_names=self.mesh_dims)
        self.shard_group, self.dp_group = mesh.get_group(self.mesh_dims[1]), mesh.get_group(self.mesh_dims[0])
        self.shard_rank = dist.get_rank(self.shard_group)

    def split(self, tensor: torch.Tensor, dim: int, indices: list[torch.Tensor]) -> nn.Parameter:
        """This rank's part of ``tensor`` (``indices[shard_rank]`` along ``dim``) as a parameter that
        gathers back to ``tensor``'s layout."""
        param = nn.Parameter(tensor.detach().index_select(dim, indices[self.shard_rank]).clone())
        self.parts[id(param)] = (dim, indices)
        return param

    @property
    def shard_divisor(self) -> int:
        """What the dp-summed gradient of a split tensor is divided by."""
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------------------------

    def _trained(self, split: bool) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad and (id(p) in self.parts) == split]

    def _reduce_gradients(self) -> None:
        for split, group, divisor in ((False, None, self.env.world_size), (True, self.dp_group, self.shard_divisor)):
            params = self._trained(split)
            if not params:
                continue
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat, group=group)
            flat /= divisor
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def _norm(self, tensors: list[torch.Tensor], split: list[torch.Tensor]) -> float:
        replicated = sum((t.double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64))
        parts = sum((t.double().pow(2).sum() for t in split), torch.zeros((), dtype=torch.float64))
        dist.all_reduce(parts, group=self.shard_group)
        return float((replicated + parts).sqrt())

    def step(self, lr: float, skip: bool = False) -> float:
        self._reduce_gradients()
        norm = self._norm([p.grad for p in self._trained(False)], [p.grad for p in self._trained(True)])
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        if math.isfinite(norm) and norm > limit:  # as clip_grad_norm_
            torch._foreach_mul_([p.grad for p in self._trained(False) + self._trained(True)], limit / (norm + 1e-6))
        if not skip and math.isfinite(norm):
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def weight_norm(self) -> float:
        """The whole model's weight norm (each tensor once)."""
        return self._norm(self._trained(False), self._trained(True))

    # -- checkpoints: whole tensors, named and laid out as in the plain model ---------------------

    def _split_names(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if id(p) in self.parts}

    def _gather(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        dim, indices = self.parts[id(param)]
        pieces = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(pieces, local.contiguous(), group=self.shard_group)
        shape = list(local.shape)
        shape[dim] = sum(len(i) for i in indices)
        whole = local.new_empty(shape)
        for index, piece in zip(indices, pieces):
            whole.index_copy_(dim, index.to(whole.device), piece)
        return whole

    def _local(self, param: nn.Parameter, whole: torch.Tensor) -> torch.Tensor:
        dim, indices = self.parts[id(param)]
        return whole.index_select(dim, indices[self.shard_rank].to(whole.device))

    def _whole_state(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=TRAINED)
        for name, param in self._split_names().items():  # new dicts: the per-parameter ones are the optimizer's
            model_state[name] = self._gather(param, model_state[name])
            optim_state["state"][name] = {key: self._gather(param, value) if value.ndim else value  # step: scalar
                                          for key, value in optim_state["state"][name].items()}
        return {"model": model_state, "optim": optim_state}

    def save(self, path: Path) -> None:
        dcp.save(self._whole_state(), checkpoint_id=path / "dcp")

    def load(self, path: Path) -> None:
        state = self._whole_state()  # the shapes to read into
        dcp.load(state, checkpoint_id=path / "dcp")
        for name, param in self._split_names().items():
            state["model"][name] = self._local(param, state["model"][name])
            state["optim"]["state"][name] = {key: self._local(param, value) if value.ndim else value
                                             for key, value in state["optim"]["state"][name].items()}
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=TRAINED)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        split = {name: p for name, p in self.model.named_parameters() if id(p) in self.parts}
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        state = {}
        for name, tensor in self.model.state_dict().items():
            if name in frozen:  # a LoRA run's base, as ignore_frozen_params leaves it out
                continue
            if name in split:
                tensor = self._gather(split[name], tensor.detach())
            state[name] = tensor.detach().cpu().clone()
        return state if self.env.is_main else None
