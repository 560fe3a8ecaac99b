"""The trainer's rank → mesh mapping on 2 simulated nodes of 2 ranks (torchrun numbers a node's ranks
consecutively): tp and ep groups are consecutive local ranks of one node, as `tessera slurm` describes."""

from __future__ import annotations

import os

import torch.distributed as dist
from spawn import spawn

from launch.slurm import MeshLayout
from trainer.config import TrainConfig
from trainer.distributed import init_distributed
from trainer.strategy.expert_parallel import ExpertParallel
from trainer.strategy.tensor_parallel import TensorParallel


def _groups() -> dict[str, list[tuple[int, int]]]:
    """(node, local rank) of each rank of this rank's tp and ep groups, as torchrun would place them."""
    env = init_distributed(need_group=True)
    seen = {}
    for name, kind in (("tp", TensorParallel), ("ep", ExpertParallel)):
        strategy = kind(TrainConfig(strategy="ddp"), env, size=2)
        strategy.make_mesh()
        ranks = dist.get_process_group_ranks(strategy.shard_group)
        seen[name] = [divmod(rank, int(os.environ["LOCAL_WORLD_SIZE"])) for rank in ranks]
    return seen


def test_tp_and_ep_groups_are_consecutive_local_ranks_of_one_node():
    per_rank = spawn(_groups, 4, env={"LOCAL_WORLD_SIZE": "2"})
    for rank, seen in enumerate(per_rank):
        for name, members in seen.items():
            assert {node for node, _ in members} == {rank // 2}, (name, rank, members)
            assert [local for _, local in members] == [0, 1], (name, rank, members)
    for name in ("tp", "ep"):
        assert f"({name} within a node)" in MeshLayout(**{name: 2}).describe(world=4, per_node=2)
