"""Context parallel (``parallel.cp`` > 1; clm and sft; dp as ddp or FSDP2): each sequence split over cp ranks.

The ``cp`` ranks of a group read the same batch; each keeps a load-balanced slice of every row
(Megatron-CP's and torchtitan's head-tail split: the row cut into 2·cp chunks, rank r keeps chunks
r and 2·cp-1-r, so each rank's share of a causal mask's work is the same). Embeddings, norms, MLPs
and the head run on the slice; the positions (RoPE, learned) are the row's global ones. Attention
all-gathers keys and values over the cp group (the Llama 3 paper's all-gather CP; its backward
reduce-scatters their gradients) and masks with the slice's global positions: causal, sliding
window, same document, non-padding keys. The model is left as written: each self-attention's
``backend`` (the per-layer attention function) is wrapped, and steps aside in forwards outside a
training step (evaluation, generation), which run whole sequences.

Each rank's loss covers its slice; the loop counts the batch once per cp rank (the ranks read the
same rows), so the sums are multiplied by cp and DDP's (or FSDP2's) average over the dp × cp ranks
gives the whole-batch gradient. The weights are those of plain ddp (replicated) or fsdp (sharded over
all dp × cp ranks, as torchtitan's dp_shard_cp): checkpoints are theirs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from model.attention import Attention, AttentionMask
from model.transformer import resolve_positions
from trainer.config import ParallelConfig
from trainer.distributed import device_mesh
from trainer.objectives.cross_entropy import IGNORE_INDEX
from trainer.strategy.ddp import DDP
from trainer.strategy.fsdp import FSDP
from trainer.strategy.tensor_parallel import gather_sequence

if TYPE_CHECKING:
    from trainer.metrics import MetricSums
    from trainer.objectives import Batch, LossOutput, Objective

# whole-row keys that do not go to the model on a slice: they shape the mask (and the positions)
_MASK_KEYS = ("document_ids", "attention_mask")


def slice_indices(length: int, size: int, rank: int) -> torch.Tensor:
    """The positions of a row of ``length`` (a multiple of 2·size) that cp rank ``rank`` of ``size``
    keeps: chunks ``rank`` and ``2·size-1-rank`` of 2·size."""
    chunks = torch.arange(length).chunk(2 * size)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]])


def _whole_row(value: object, ids: torch.Tensor) -> bool:
    """Whether a batch entry has a value per token of ``ids`` (input ids, labels, masks, positions)."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == ids.shape


@dataclasses.dataclass(eq=False)
class SliceMask(AttentionMask):
    """The mask of a slice's queries over the gathered keys, given whole (eager/SDPA read it through
    :meth:`allowed`/:meth:`additive`)."""

    visible: torch.Tensor | None = None  # [B, 1, T/cp, T] bool

    def wants_flex(self, device: torch.device, tq: int, tk: int, dropout_p: float) -> bool:
        return False

    def plain_causal(self, tq: int, tk: int) -> bool:
        return False

    def _allowed(self, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
        return self.visible | ~self.visible.any(dim=-1, keepdim=True)  # a padding query sees every key


def slice_mask(queries: torch.Tensor, keys: torch.Tensor, document_ids: torch.Tensor | None,
               padding: torch.Tensor | None, sliding_window: int | None) -> SliceMask:
    """Causal (and windowed) by global position, within a document, over real keys: ``queries`` and
    ``keys`` are the global positions of the slice's queries and of the gathered keys."""
    visible = (keys[None, :] <= queries[:, None])[None, None]
    if sliding_window is not None:
        visible = visible & (queries[:, None] - keys[None, :] < sliding_window)
    if document_ids is not None:
        visible = visible & (document_ids[:, queries, None] == document_ids[:, None, keys])[:, None]
    if padding is not None:
        visible = visible & padding.bool()[:, None, None, keys]
    return SliceMask(causal=True, visible=visible)


class _GatheredAttention:
    """A self-attention backend that attends the slice's queries to the keys and values of the whole
    row (gathered over the cp group), while the strategy has a slice mask up."""

    def __init__(self, backend: Callable[..., torch.Tensor], strategy: ContextParallel) -> None:
        self.backend, self.strategy = backend, strategy

    def __call__(self, q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
        sliced = self.strategy.mask
        if sliced is None:
            return self.backend(q, k, v, mask, scale, dropout_p)
        heads = k.shape[1]
        # one collective for both: [B, 2·Hkv, T/cp, D] → sequence on dim 1 → [B, 2·Hkv, T, D] (cp ranks' order)
        kv = gather_sequence(torch.cat([k, v], dim=1).transpose(1, 2), self.strategy.cp_group).transpose(1, 2)
        return self.backend(q, kv[:, :heads], kv[:, heads:], sliced, scale, dropout_p)


class ContextParallel:
    """Each sequence split over the cp ranks of a (dp, cp) mesh; mixed into the data-parallel strategy
    (:class:`ContextParallelDDP`, :class:`ContextParallelFSDP`) that runs over every rank."""

    def __init__(self, cfg, env, accumulation: int = 1, size: int = 2) -> None:
        super().__init__(cfg, env, accumulation)
        self.size = size
        self.data_copies = size  # the mesh is (dp, cp), row-major: ranks d·cp … d·cp + cp-1 read batch d
        self.mask: SliceMask | None = None  # up during a training step's micro-batch

    def parallelize(self, model: nn.Module) -> nn.Module:
        cfg, cp = model.config, self.size
        if self.env.world_size % cp:
            raise ConfigError(f"parallel.cp={cp} must divide the {self.env.world_size} ranks")
        ParallelConfig(cp=cp).check_model(cfg)  # refused at load already; a guard for direct callers
        mesh = device_mesh(self.env.device.type, (self.env.world_size // cp, cp), ("dp", "cp"))
        self.cp_group = mesh.get_group("cp")
        self.cp_rank = dist.get_rank(self.cp_group)
        for module in model.modules():
            if isinstance(module, Attention) and not module.cross:
                module.backend = _GatheredAttention(module.backend, self)
        self.sliding_window = cfg.sliding_window
        return super().parallelize(model)

    def _slice(self, batch: Batch) -> Batch:
        """This rank's slice of every row, with global positions; its slice mask put up. Rows of a
        length 2·cp does not divide (unpacked SFT) are right-padded: masked keys, no targets."""
        ids = batch["input_ids"]
        positions = resolve_positions(ids, batch.get("attention_mask"), batch.get("document_ids"),
                                      batch.get("position_ids"))
        batch = {**batch, "position_ids": positions}
        pad = -ids.shape[1] % (2 * self.size)
        if pad:
            batch = {"attention_mask": torch.ones_like(ids), **batch}
            batch = {key: F.pad(value, (0, pad), value=IGNORE_INDEX if key == "labels" else 0)
                     if _whole_row(value, ids) else value for key, value in batch.items()}
            ids = batch["input_ids"]
        length = ids.shape[1]
        keys = torch.cat([slice_indices(length, self.size, r) for r in range(self.size)]).to(ids.device)
        mine = keys.view(self.size, -1)[self.cp_rank]
        self.mask = slice_mask(mine, keys, batch.get("document_ids"), batch.get("attention_mask"),
                               self.sliding_window)
        return {key: value[:, mine] if _whole_row(value, ids) else value
                for key, value in batch.items() if key not in _MASK_KEYS}

    def forward_backward(self, micro_batches: Sequence[Batch], scale: float,
                         loss: Callable[[Batch], tuple[LossOutput, torch.Tensor | float]],
                         objective: Objective) -> MetricSums:
        cp = self.size
        if objective.data_objective not in ("clm", "sft"):
            raise ConfigError(f"parallel.cp={cp} trains token-level causal objectives (clm, sft), not "
                              f"{objective.data_objective}")

        def slice_loss(batch: Batch) -> tuple[LossOutput, torch.Tensor | float]:
            out, extra = loss(self._slice(batch))  # the mask stays up through this micro-batch's backward
            return dataclasses.replace(out, loss_sum=out.loss_sum * cp,
                                       metrics={k: v * cp for k, v in out.metrics.items()}), extra * cp

        try:
            return super().forward_backward(micro_batches, scale, slice_loss, objective)
        finally:
            self.mask = None


class ContextParallelDDP(ContextParallel, DDP):
    pass


class ContextParallelFSDP(ContextParallel, FSDP):
    pass


def build(cfg, env, accumulation: int, size: int) -> ContextParallel:
    """Context parallel over ``size`` ranks, data parallel as ``cfg.strategy`` (ddp or fsdp)."""
    return (ContextParallelFSDP if str(cfg.strategy) == "fsdp" else ContextParallelDDP)(cfg, env, accumulation, size)
