"""A rank's piece of a split tensor described to torch.distributed.checkpoint (DCP) as blocks of the whole
tensor, so that each rank writes and reads only its own elements while the checkpoint holds the whole
tensor, under its plain name and shape, that any mesh (or one process) reads back.

A tensor-parallel split is an index set, not one slice: rank r holds rows q_r, k_r and v_r of the fused
[q|k|v] weight, three runs of the whole tensor, and under FSDP2 only its dp shard of those. DTensor
describes one block per rank, so :class:`Chunks` implements DCP's ``_Checkpointable`` protocol itself
(``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``; torch/distributed/
_checkpointable.py, which DTensor and torchrec's ``LocalShardsWrapper`` implement, as does Megatron-LM's
``CheckpointableShardedTensor``, megatron/core/dist_checkpointing/strategies/checkpointable.py at 7cbcca674):
several blocks per rank, each a view of the rank's local tensor. DCP then plans the reads of any other
layout chunk by chunk. (ShardedTensor, the other way to give several blocks per rank, is deprecated in
torch 2.13 and all-gathers its metadata per tensor.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor


class Chunks(torch.Tensor):
    """The whole tensor's shape over this rank's blocks of it: (view of the local tensor, its offsets in the
    whole). Only DCP reads it: a DCP save writes the views, a load copies into them (so into the local tensor)."""

    blocks: list[tuple[torch.Tensor, torch.Size]]
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, whole_shape: torch.Size, like: torch.Tensor,
                blocks: list[tuple[torch.Tensor, torch.Size]]) -> Chunks:
        chunks = torch.Tensor._make_wrapper_subclass(cls, whole_shape, dtype=like.dtype, device=like.device)
        chunks.blocks = blocks
        return chunks

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on Chunks, which only describe a rank's blocks to DCP")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Chunks(shape={list(self.shape)}, {len(self.blocks)} blocks)"

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offsets, sizes=block.shape) for block, offsets in self.blocks]

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk, TensorProperties.create_from_tensor(block), self.shape))
                for chunk, (block, _) in zip(self.__create_chunk_list__(), self.blocks)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for block, offsets in self.blocks:
            if offsets == index.offset:
                return block
        raise ValueError(f"{index.fqn}: no block of this rank at {index.offset}")


def _runs(indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """(position, value, length) of each run of consecutive values in ``indices``."""
    if not len(indices):
        return []
    starts = [0, *(torch.nonzero(indices.diff() != 1).flatten() + 1).tolist()]
    ends = [*starts[1:], len(indices)]
    return [(start, int(indices[start]), end - start) for start, end in zip(starts, ends)]


def split_chunks(tensor: torch.Tensor, dim: int, indices: torch.Tensor, whole_size: int) -> Chunks:
    """:class:`Chunks` of this rank's piece ``tensor`` of a whole tensor: the piece holds the whole's
    ``indices`` along ``dim`` (all of it along the other dims); under FSDP2 ``tensor`` is a DTensor
    sharded over dp and this rank holds one block of the piece."""
    if isinstance(tensor, DTensor):  # where this rank's dp shard lies in the piece
        local, [shard] = tensor.to_local(), tensor.__create_chunk_list__()
        offsets = list(shard.offsets)
    else:
        local, offsets = tensor, [0] * tensor.ndim
    whole_shape = list(tensor.shape)
    whole_shape[dim] = whole_size
    held = indices[offsets[dim]:offsets[dim] + local.shape[dim]]  # of the whole, along ``dim``
    blocks = []
    for position, start, length in _runs(held) if local.numel() else ():
        block_offsets = list(offsets)
        block_offsets[dim] = start
        blocks.append((local.narrow(dim, position, length), torch.Size(block_offsets)))
    return Chunks(torch.Size(whole_shape), local, blocks)
