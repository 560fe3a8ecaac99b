"""KTO (Ethayarajh et al., 2024) on unpaired examples ``{prompt, completion, label}``, as TRL's
KTOTrainer defines it (huggingface/trl at f2cd577, ``trl/trainer/kto_trainer.py``, ``_compute_loss``).

With r = β·(π - ρ) the implicit reward of a completion (summed log-probs of policy and reference) and
z = max(0, mean over the micro-batch, and over ranks, of π - ρ on *mismatched* pairs (each prompt with
the previous example's completion), detached) the KL reference point:

  desirable    λ_D·(1 - σ(β·(π - ρ) - β·z))
  undesirable  λ_U·(1 - σ(β·z - β·(π - ρ)))

averaged over the examples (the loop's units). Metrics with TRL's names: ``kl``, ``rewards/chosen``
and ``rewards/rejected`` (means over the desirable and undesirable examples), ``logps/chosen``,
``logps/rejected``. The reference is a frozen copy of the starting model (live).
"""

from __future__ import annotations

import dataclasses

import torch

from common.errors import ConfigError
from trainer.config import Reference
from trainer.distributed import all_reduce
from trainer.objectives import Batch, LossOutput, ObjectiveContext
from trainer.objectives.pairs import pair_logps


@dataclasses.dataclass(frozen=True)
class KTOLosses:
    losses: torch.Tensor  # per example, weighted
    rewards: torch.Tensor  # β·(π - ρ), detached
    kl: torch.Tensor  # the reference point z


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
               beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOLosses:
    """The closed form above, per example; ``kl`` is the (already clamped, detached) reference point."""
    logratios = logps - ref_logps
    desirable = desirable.bool()
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return KTOLosses(torch.where(desirable, chosen, rejected), beta * logratios.detach(), kl)


def kl_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z: the mismatched pairs' mean log-ratio, averaged over ranks as TRL gathers it, clamped at 0."""
    local = (kl_logps - ref_kl_logps).mean().detach().double()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return (all_reduce(local.clone()) / world).clamp(min=0).to(kl_logps.dtype)


def as_pairs(batch: Batch) -> Batch:
    """The batch in the pair layout :func:`pair_logps` reads: completion as chosen, kl as rejected."""
    return {f"{side}_{key}": batch[f"{prefix}_{key}"] for side, prefix in (("chosen", "completion"), ("rejected", "kl"))
            for key in ("input_ids", "labels", "attention_mask")}


class KTOObjective:
    data_objective = "unpaired"

    def __init__(self, beta: float, desirable_weight: float, undesirable_weight: float,
                 reference: torch.nn.Module, chunk_size: int = 0) -> None:
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.reference, self.chunk_size = reference, chunk_size

    def count(self, batch: Batch) -> int:
        return int(batch["kto_labels"].shape[0])

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        pairs = as_pairs(batch)
        policy = pair_logps(model, pairs, self.chunk_size)
        with torch.no_grad():
            reference = pair_logps(self.reference, pairs, self.chunk_size)
        kl = kl_reference_point(policy.rejected, reference.rejected)
        desirable = batch["kto_labels"].bool()
        out = kto_losses(policy.chosen, reference.chosen, desirable, kl, beta=self.beta,
                         desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        n = torch.tensor(float(desirable.numel()), device=kl.device)
        chosen, rejected = desirable.double(), (~desirable).double()
        logps = policy.chosen.detach().double()
        ratios = {
            "kl": (kl.detach().double() * n, n),
            "rewards/chosen": ((out.rewards.double() * chosen).sum(), chosen.sum()),
            "rewards/rejected": ((out.rewards.double() * rejected).sum(), rejected.sum()),
            "logps/chosen": ((logps * chosen).sum(), chosen.sum()),
            "logps/rejected": ((logps * rejected).sum(), rejected.sum()),
        }
        return LossOutput(loss_sum=out.losses.sum(), count=n, ratios=ratios)


def build(ctx: ObjectiveContext) -> KTOObjective:
    from trainer.reference import live_reference

    align = ctx.cfg.align
    if align.beta <= 0:
        raise ConfigError(f"align.beta must be > 0 for kto, got {align.beta}")
    if align.reference is not Reference.live:
        raise ConfigError("align.loss=kto needs align.reference=live (its KL point is re-estimated every batch)")
    if ctx.cfg.train.micro_batch_size < 2:
        raise ConfigError("align.loss=kto needs train.micro_batch_size >= 2: its KL term pairs each prompt with "
                          "another example's completion")
    return KTOObjective(align.beta, align.desirable_weight, align.undesirable_weight, live_reference(ctx),
                        ctx.cfg.train.loss_chunk_size)
