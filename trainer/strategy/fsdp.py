"""FSDP2: ``fully_shard`` on every block and then the root; HSDP over nodes; bf16; CPU offload.

bf16 uses a ``MixedPrecisionPolicy`` (bf16 compute, fp32 gradient reduction, fp32 master
weights in the sharded parameters), so no autocast. With ``train.hsdp`` the mesh is 2-D
(nodes × ranks per node): parameters are sharded within a node and replicated across nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from common.errors import ConfigError
from trainer.distributed import device_mesh
from trainer.strategy import materialize
from trainer.strategy.single import Single

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def fsdp_options(cfg: TrainConfig, device: torch.device) -> dict:
    """``fully_shard``'s keywords but the mesh: the bf16 policy and CPU offload (on accelerators; on a
    CPU-only host the shards already live in memory)."""
    offload = cfg.offload != "none" and device.type != "cpu"
    return {
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if cfg.precision == "bf16"
        else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
    }


def shard_model(model: nn.Module, mesh: DeviceMesh, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """``fully_shard`` every block, then the root, over ``mesh`` (a fresh meta-device model is
    materialised block by block on the host, each block sharded as soon as it is ready). Tensor
    and expert parallel call it after splitting the model (tp: over its dp sub-mesh; ep: over every
    rank, the experts already sharded over dp)."""
    options = {"mesh": mesh, **fsdp_options(cfg, device)}
    if not materialize(model, cfg.seed, on_block=lambda block: fully_shard(block, **options)):
        for block in model.blocks():
            fully_shard(block, **options)
    return fully_shard(model, **options)


class FSDP(Single):
    def mesh(self) -> DeviceMesh:
        env = self.env
        if not self.cfg.hsdp:
            return device_mesh(env.device.type, (env.world_size,))
        if env.world_size % env.local_world_size:
            raise ConfigError(f"train.hsdp: world size {env.world_size} is not nodes × {env.local_world_size}")
        return device_mesh(env.device.type, (env.num_nodes, env.local_world_size), ("replicate", "shard"))

    def shard(self, model: nn.Module) -> nn.Module:
        return shard_model(model, self.mesh(), self.cfg, self.env.device)

    def place(self, model: nn.Module) -> nn.Module:
        """Left where it is: :meth:`shard` materialises a fresh model block by block on the host and
        ``fully_shard`` moves each block to the device as it shards it, so the whole unsharded model
        is never on the device, nor (fresh) on the host."""
        return model

    def parallelize(self, model: nn.Module) -> nn.Module:
        return self.shard(model)

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        return self.shard(model).eval()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(last)
        yield
