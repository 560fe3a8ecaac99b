"""The shared part of expert and tensor parallel: some parameters split over a group of ranks (the
"shard group"), the rest whole on every rank, on a 2-D (dp, shard) mesh; the model's own tensors
stay plain (with train.strategy=fsdp, FSDP2 then shards them: :attr:`Partitioned.sharded`, :meth:`Partitioned.shard`).

Gradients are summed after the last micro-batch (under FSDP2, which averages them itself, only the
partial ones): replicated ones
over the world, divided by the world size (what DDP's average gives); split ones over their dp
replicas, divided by :attr:`shard_divisor`; partial ones (whole tensors whose gradient each rank of a
shard group holds a part of: sequence-parallel norms, per-head q/k norms) over the world, divided by
dp. The gradient norm counts each tensor once.

Checkpoints hold whole tensors under the plain model's names and shapes, so a checkpoint resumes under
ddp, fsdp, one process or another mesh, and any of theirs here; but no rank holds a whole split tensor:
each writes only its own blocks of the split tensors and their Adam moments (its rows of [q|k|v] are
several runs of the whole; under FSDP2 its dp shard of them), and a load reads only the blocks it holds,
DCP planning the reads across layouts (:mod:`trainer.strategy.dcp_chunks`). ``full_state_dict`` (the
``model/`` export) streams: one tensor at a time gathered whole over the shard group (and dp), kept on
rank 0 only.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from trainer.distributed import device_mesh
from trainer.strategy import materialize
from trainer.strategy.dcp_chunks import split_chunks
from trainer.strategy.optim import clip_and_step
from trainer.strategy.single import TRAINED, Single
from trainer.strategy.tp_collectives import pad_to


class Layout(enum.Enum):
    """How a trainable parameter lies on the ranks of a shard group."""

    replicated = "replicated"  # whole on each, the same gradient on each
    partial = "partial"  # whole on each, each holding a part of the gradient's sum
    split = "split"  # a different part on each


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor FSDP2 shards over dp (a DTensor); a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def even_ranges(total: int, parts: int, offset: int = 0) -> list[torch.Tensor]:
    """Each rank's indices when ``total`` splits into ``parts`` contiguous equal ranges (from ``offset``)."""
    return [offset + r for r in torch.arange(total).split(total // parts)]


class Partitioned(Single):
    mesh_dims = ("dp", "shard")
    sharded = False  # whether FSDP2 shards the split model (:meth:`shard`)

    def __init__(self, cfg, env, accumulation: int = 1, size: int = 2) -> None:
        super().__init__(cfg, env, accumulation)
        self.size = size  # ranks in one shard group
        self._split_ids: dict[int, tuple[int, list[torch.Tensor]]] = {}  # id(param) -> (dim, each rank's indices)
        self._partial_ids: set[int] = set()
        # by parameter name once partitioned (FSDP2 replaces the tensors, not the names)
        self.splits: dict[str, tuple[int, list[torch.Tensor]]] = {}
        self.layouts: dict[str, Layout] = {}

    def make_mesh(self) -> None:
        self.mesh = device_mesh(self.env.device.type, (self.env.world_size // self.size, self.size), self.mesh_dims)
        self.shard_group, self.dp_group = self.mesh.get_group(self.mesh_dims[1]), self.mesh.get_group(self.mesh_dims[0])
        self.shard_rank = dist.get_rank(self.shard_group)

    def split(self, tensor: torch.Tensor, dim: int, indices: list[torch.Tensor],
              size: int | None = None) -> nn.Parameter:
        """This rank's part of ``tensor`` (``indices[shard_rank]`` along ``dim``) as a parameter that
        gathers back to ``tensor``'s layout; with ``size``, zeros after it up to that length (padding,
        left out of checkpoints: a padded vocabulary's last shard)."""
        part = tensor.detach().index_select(dim, indices[self.shard_rank])
        param = nn.Parameter(pad_to(part, dim, size).clone() if size else part.clone())
        self._split_ids[id(param)] = (dim, indices)
        return param

    def mark_partial(self, param: nn.Parameter) -> None:
        """``param`` stays whole, but each rank of the shard group computes a part of its gradient."""
        self._partial_ids.add(id(param))

    def partition(self, model: nn.Module) -> None:
        """Check the model and the mesh, make the mesh, split the model's tensors (:meth:`split`)."""
        raise NotImplementedError

    def place(self, model: nn.Module) -> nn.Module:
        """On the host: :meth:`parallelize` moves only this rank's parts to the device (FSDP2 its
        dp shards of them), so the whole model never sits on the device."""
        materialize(model, self.cfg.seed)
        return model

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """Whole on every rank's device (a reference model is not split)."""
        model.requires_grad_(False)
        return Single.place(self, model).eval()

    def parallelize(self, model: nn.Module) -> nn.Module:
        self.partition(model)
        for name, param in model.named_parameters():
            if id(param) in self._split_ids:
                self.splits[name] = self._split_ids[id(param)]
            self.layouts[name] = (Layout.split if id(param) in self._split_ids else
                                  Layout.partial if id(param) in self._partial_ids else Layout.replicated)
        return self.shard(model) if self.sharded else model.to(self.env.device)

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2 over the dp sub-mesh (tensor parallel); sets :attr:`whole_group`, the ranks a whole
        tensor is sharded over."""
        from trainer.strategy.fsdp import shard_model

        self.whole_group = self.dp_group
        return shard_model(model, self.mesh[self.mesh_dims[0]], self.cfg, self.env.device)

    @property
    def shard_divisor(self) -> int:
        """What the dp-summed gradient of a split tensor is divided by."""
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------------------------

    def _trained(self, *layouts: Layout) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if p.requires_grad and self.layouts[name] in layouts]

    def _reduce_gradients(self) -> None:
        dp = self.env.world_size // self.size
        if self.sharded:  # FSDP2 averaged every gradient over the ranks it shards it over in backward
            rescale = self.shard_divisor // dp  # split ones were averaged over dp (ep: the world's share remains)
            if rescale > 1:
                torch._foreach_div_([_local(p.grad) for p in self._trained(Layout.split) if p.grad is not None],
                                    rescale)
            buckets = [(Layout.partial, self.shard_group, 1)]
        else:
            buckets = [(Layout.replicated, None, self.env.world_size),
                       (Layout.split, self.dp_group, self.shard_divisor), (Layout.partial, None, dp)]
        for layout, group, divisor in buckets:
            params = self._trained(layout)
            if not params:
                continue
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [_local(p.grad) for p in params]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=group)
            flat /= divisor
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def _norm(self, whole: list[torch.Tensor], split: list[torch.Tensor]) -> float:
        """The L2 norm of tensors each rank holds whole (or its dp shard of) and of split ones."""
        def squares(tensors: list[torch.Tensor]) -> torch.Tensor:
            return sum((_local(t).double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64))

        replicated, parts = squares(whole), squares(split)
        if self.sharded:
            dist.all_reduce(replicated, group=self.whole_group)
            dist.all_reduce(parts)
        else:
            dist.all_reduce(parts, group=self.shard_group)
        return float((replicated + parts).sqrt())

    def step(self, lr: float, skip: bool = False) -> float:
        self._reduce_gradients()
        whole, split = self._trained(Layout.replicated, Layout.partial), self._trained(Layout.split)
        norm = self._norm([p.grad for p in whole], [p.grad for p in split])
        grads = [_local(p.grad) for p in whole + split]
        return clip_and_step(self.optimizer, grads, norm, self.cfg.grad_clip, lr, skip)

    @torch.no_grad()
    def weight_norm(self) -> float:
        """The whole model's weight norm (each tensor once)."""
        return self._norm(self._trained(Layout.replicated, Layout.partial), self._trained(Layout.split))

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        yield

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.sharded else super().autocast()  # FSDP2's policy casts

    # -- checkpoints: each rank's pieces of the whole tensors, named as in the plain model -----------

    def _gather(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor ``name`` from this rank's piece of it (every rank calls it)."""
        local = local.full_tensor() if isinstance(local, DTensor) else local
        if name not in self.splits:
            return local
        dim, indices = self.splits[name]
        pieces = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(pieces, local.contiguous(), group=self.shard_group)
        shape = list(local.shape)
        shape[dim] = sum(len(i) for i in indices)
        whole = local.new_empty(shape)
        for index, piece in zip(indices, pieces):  # a padded piece's zeros past its indices are dropped
            whole.index_copy_(dim, index.to(whole.device), piece.narrow(dim, 0, len(index)))
        return whole

    def _state(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=TRAINED)
        return self._copy({"model": model_state, "optim": optim_state})  # (its per-parameter dicts are the optimizer's)

    @staticmethod
    def _copy(state: dict) -> dict:
        """New dicts (the model's, each parameter's optimizer state) over the same tensors."""
        optim = state["optim"]
        return {"model": dict(state["model"]),
                "optim": {**optim, "state": {name: dict(entry) for name, entry in optim["state"].items()}}}

    @staticmethod
    def _tensors(state: dict) -> Iterator[tuple[str, dict, str]]:
        """(parameter name, holder, key) of every per-parameter tensor of :meth:`_state`'s dict."""
        for name in state["model"]:
            yield name, state["model"], name
        for name, entry in state["optim"]["state"].items():
            for key, value in entry.items():
                if value.ndim:  # not the scalar step
                    yield name, entry, key

    def _chunked(self, state: dict) -> dict:
        """``state`` with each split tensor as :class:`~trainer.strategy.dcp_chunks.Chunks` of the whole
        one (views of this rank's piece); whole tensors (FSDP2's DTensors of them) as they are."""
        chunked = self._copy(state)
        for name, holder, key in self._tensors(chunked):
            if name in self.splits:
                dim, indices = self.splits[name]
                holder[key] = split_chunks(holder[key], dim, indices[self.shard_rank],
                                           sum(len(i) for i in indices))
        return chunked

    def save(self, path: Path) -> None:
        dcp.save(self._chunked(self._state()), checkpoint_id=path / "dcp")

    def load(self, path: Path) -> None:
        state = self._state()
        dcp.load(self._chunked(state), checkpoint_id=path / "dcp")  # into views of ``state``'s tensors
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=TRAINED)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Whole tensors on rank 0, gathered one at a time (each rank holds one whole tensor at once)."""
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        state = {}
        for name, tensor in self.model.state_dict().items():
            if name in frozen:  # a LoRA run's base, as ignore_frozen_params leaves it out
                continue
            whole = self._gather(name, tensor.detach())
            if self.env.is_main:
                state[name] = whole.cpu().clone()
        return state if self.env.is_main else None
