"""Process-group set-up from torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Without those variables the run is one process; it still gets a one-rank gloo group when the
strategy needs one (FSDP and DeepSpeed always talk through a process group). nccl on GPUs, gloo
on CPU. ``launch/env.py`` maps other launchers' variables onto these before calling us. ``teardown``
ends every group, leaving nothing that holds one (:func:`device_mesh`, :func:`release_at_teardown`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from common.errors import UserError
from common.net import free_port

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


_ADDED_ENV: list[str] = []  # launcher variables init_distributed set, which teardown removes


def init_distributed(need_group: bool, timeout_s: int = 600) -> DistEnv:
    """Join (or create) the process group described by the environment; idempotent."""
    world_size = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", rank)
    local_world_size = _int_env("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world_size > 1 or need_group) and not dist.is_initialized():
        variables = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
        if world_size == 1:
            variables = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **variables}
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ and name not in variables:
                raise UserError(f"{name} is not set; start multi-process runs with torchrun or tessera --nproc")
        for name, value in variables.items():  # what torch reads; the launcher's own values stay
            if name not in os.environ:
                os.environ[name] = value
                _ADDED_ENV.append(name)
        backend = "nccl" if device.type == "cuda" else "gloo"
        _bind_world_defaults_to_none()
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank, world_size, local_rank, local_world_size, device)


def _bind_world_defaults_to_none() -> None:
    """Import torch.distributed.nn while no process group exists. Its functions take ``group=group.WORLD``
    as a default argument, evaluated at import: imported later (DDP and DCP import it), they hold the live
    group for good, and destroy_process_group leaves its gloo threads and sockets running until interpreter
    shutdown tears them down in no set order (a rank that finished its run then aborted at exit:
    "terminate called without an active exception"). Imported first, the defaults are None."""
    import torch.distributed.nn  # noqa: F401


# (object, how to release it): what still holds a process group when teardown comes, held weakly
_AT_TEARDOWN: list[tuple[weakref.ref, Callable[[Any], None]]] = []


def release_at_teardown(obj: object, release: Callable[[Any], None]) -> None:
    """Have :func:`teardown` call ``release(obj)`` before it ends the process group, if ``obj`` is alive then."""
    _AT_TEARDOWN.append((weakref.ref(obj), release))


def device_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...] | None = None) -> DeviceMesh:
    """``init_device_mesh`` whose process groups :func:`teardown` releases (every strategy makes its meshes here)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    release_at_teardown(mesh, _drop_mesh_groups)
    return mesh


def _drop_mesh_groups(mesh: DeviceMesh) -> None:
    """DTensor's caches (sharding propagation, redistribution plans) keep a mesh alive for good, and the mesh
    holds its groups in ``_pg_registry``. Private: torch 2.13 has no public way to let go of them; the
    registry only serves torch.compile tracing, which has nothing left to trace once the groups are gone."""
    registry = getattr(mesh, "_pg_registry", None)
    if isinstance(registry, dict):
        registry.clear()


def teardown(barrier: bool = True) -> None:
    """Leave the process group; after a clean run a barrier first, so no rank exits while others talk.
    Nothing may hold a group afterwards: a gloo group still referenced runs its threads into interpreter
    shutdown, which tears them down in no set order (a rank that had finished then aborted at exit now and
    then: "terminate called without an active exception"). The launcher variables :func:`init_distributed`
    added go too: left behind, they made libraries used later in the same process (accelerate, under
    transformers' Trainer) start a process group of their own."""
    if dist.is_initialized() and barrier:
        dist.barrier()
    try:
        _release_all()
    finally:
        if dist.is_initialized():
            deepspeed_comm = sys.modules.get("deepspeed.comm")  # its destroy also drops the groups DeepSpeed keeps
            if deepspeed_comm is not None and deepspeed_comm.is_initialized():
                deepspeed_comm.destroy_process_group()
            else:
                dist.destroy_process_group()
            gc.collect()  # a wrapped model's reference cycles (FSDP2's hooks hold its state) hold its groups
    for name in _ADDED_ENV:
        os.environ.pop(name, None)
    _ADDED_ENV.clear()


def _release_all() -> None:
    """Run :func:`release_at_teardown`'s releases, the latest first (a function of its own: no local outlives
    it to hold an object through teardown's collection)."""
    while _AT_TEARDOWN:
        ref, release = _AT_TEARDOWN.pop()
        obj = ref()
        if obj is not None:
            release(obj)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_gather_object(obj: object) -> list[object]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a strategy's wrapper: DDP's and DeepSpeed's ``module`` (FSDP2 and the
    parallel strategies wrap in place)."""
    return getattr(model, "module", model)
