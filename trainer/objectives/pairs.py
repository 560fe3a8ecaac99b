"""Summed log-probs of both continuations of each preference pair, in one forward per batch.

Shared by the preference losses, the reward model (which scores the same stacked pairs and logs the
same TRL reward metrics) and the reference precompute pass, so none of those imports another.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from data.collate import IGNORE_INDEX
from trainer.distributed import unwrap
from trainer.objectives import Batch
from trainer.objectives.cross_entropy import head_cross_entropy


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Summed log-probs of each pair's chosen and rejected continuation, and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)



def concat_pairs(batch: Batch, key: str, pad: int) -> torch.Tensor:
    """``chosen_<key>`` over ``rejected_<key>`` in one [2B, T] tensor, right-padded with ``pad``."""
    chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    width = max(chosen.shape[1], rejected.shape[1])
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad) for t in (chosen, rejected)])


def pair_inputs(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Input ids and keyword inputs of chosen and rejected stacked, for one forward per pair batch."""
    kwargs = {"attention_mask": concat_pairs(batch, "attention_mask", 0)} if "chosen_attention_mask" in batch else {}
    return concat_pairs(batch, "input_ids", 0), kwargs


def pair_logps(model: torch.nn.Module, batch: Batch, chunk_size: int = 0) -> PairLogps:
    """Summed log-probs of the labelled (shifted, -100 elsewhere) tokens of each continuation.

    With ``chunk_size`` the LM head runs inside the chunked linear+CE, one sequence at a time, so
    the [2B, T, V] logits never exist (as for the token objectives)."""
    input_ids, kwargs = pair_inputs(batch)
    labels = concat_pairs(batch, "labels", IGNORE_INDEX)
    if chunk_size:
        liger = unwrap(model).config.kernels == "liger"
        sums = -model(input_ids, **kwargs, head_loss=head_cross_entropy(labels, chunk_size, liger, per_row=True))
    else:
        logits = model(input_ids, **kwargs)
        sums = -F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(labels.shape).sum(-1)
    tokens = (labels != IGNORE_INDEX).sum(-1)
    n = batch["chosen_input_ids"].shape[0]
    return PairLogps(sums[:n], sums[n:], tokens[:n], tokens[n:])


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metric names over per-pair rewards (or scores), each summed over the pairs (the
    loop divides by the global pair count)."""
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "rewards/margins": (chosen - rejected).sum(),
    }
