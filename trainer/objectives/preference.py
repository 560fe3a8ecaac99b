"""Preference objectives on (chosen, rejected) pairs: DPO, IPO, cDPO, SimPO and ORPO.

The formulas follow the papers as TRL implements them, and the logged metrics carry TRL's names
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``). With β, the policy's and the reference's summed log-probs
π_c, π_r, ρ_c, ρ_r of the chosen and rejected continuations, and ā the per-token mean log-prob:

  dpo    -log σ(β·[(π_c-ρ_c) - (π_r-ρ_r)])
  cdpo   the same with label smoothing ε: -(1-ε)·log σ(β·h) - ε·log σ(-β·h)
  ipo    (h̄ - 1/(2β))², h̄ built from per-token means
  simpo  -log σ(β·(ā_c - ā_r) - γ)                         reference-free
  orpo   α·NLL_c - β·log σ(log odds(ā_c) - log odds(ā_r))   reference-free

The reference is either precomputed (``ref_chosen_logps``/``ref_rejected_logps`` in the batch, see
:mod:`trainer.reference`) or a frozen copy of the starting model held by the same strategy.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from trainer.objectives import Batch, LossOutput, ObjectiveContext
from trainer.objectives.pairs import PairLogps, pair_logps, reward_metrics

if TYPE_CHECKING:
    from trainer.config import AlignConfig

REFERENCE_FREE = frozenset({"simpo", "orpo"})
LENGTH_NORMALISED = frozenset({"ipo", "simpo", "orpo"})


@dataclasses.dataclass(frozen=True)
class PairLosses:
    """Per-pair losses, implicit rewards and the log-probs the loss used (summed or per token)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def preference_losses(
    policy: PairLogps,
    reference: PairLogps | None,
    *,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_alpha: float = 1.0,
) -> PairLosses:
    """The closed-form loss of each pair under ``loss`` (dpo, cdpo, ipo, simpo, orpo)."""
    if loss in LENGTH_NORMALISED:
        chosen, rejected = policy.per_token()
    else:
        chosen, rejected = policy.chosen, policy.rejected
    if loss in REFERENCE_FREE:
        if loss == "simpo":
            logits = beta * (chosen - rejected) - simpo_gamma
            losses = -F.logsigmoid(logits)
        else:
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            losses = -orpo_alpha * chosen - beta * F.logsigmoid(log_odds)
        return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach(), chosen, rejected)
    if reference is None:
        raise ValueError(f"{loss} needs reference log-probs")
    ref_chosen, ref_rejected = reference.per_token() if loss == "ipo" else (reference.chosen, reference.rejected)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    logits = chosen_ratio - rejected_ratio
    if loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        smoothing = label_smoothing if loss == "cdpo" else 0.0
        losses = -(1 - smoothing) * F.logsigmoid(beta * logits) - smoothing * F.logsigmoid(-beta * logits)
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), chosen, rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def pair_metrics(out: PairLosses) -> dict[str, torch.Tensor]:
    """TRL's metric names, each summed over the pairs (the loop divides by the global pair count)."""
    return reward_metrics(out.chosen_rewards, out.rejected_rewards) | {
        "logps/chosen": out.chosen_logps.detach().sum(),
        "logps/rejected": out.rejected_logps.detach().sum(),
    }


class PreferenceObjective:
    """The loop's view of a preference loss: pairs are the units."""

    data_objective = "preference"

    def __init__(self, align: AlignConfig, reference_model: torch.nn.Module | None, chunk_size: int = 0) -> None:
        self.align = align
        self.loss_name = str(align.loss)
        self.reference_model = reference_model
        self.chunk_size = chunk_size

    def count(self, batch: Batch) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def reference_logps(self, batch: Batch, policy: PairLogps) -> PairLogps | None:
        if self.loss_name in REFERENCE_FREE:
            return None
        if self.reference_model is not None:  # live: stored values, if any, may be another model's
            with torch.no_grad():
                return pair_logps(self.reference_model, batch, self.chunk_size)
        if "ref_chosen_logps" in batch:
            chosen, rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            return PairLogps(chosen, rejected, policy.chosen_tokens, policy.rejected_tokens)
        raise ConfigError(
            "align.reference is precomputed but the batch has no reference log-probs; run the "
            "precompute pass (trainer.reference) on the data first"
        )

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        policy = pair_logps(model, batch, self.chunk_size)
        out = preference_losses(
            policy,
            self.reference_logps(batch, policy),
            loss=self.loss_name,
            beta=self.align.beta,
            label_smoothing=self.align.label_smoothing,
            simpo_gamma=self.align.simpo_gamma,
            orpo_alpha=self.align.orpo_alpha,
        )
        count = torch.tensor(policy.chosen.shape[0], device=policy.chosen.device)
        return LossOutput(loss_sum=out.losses.sum(), count=count, metrics=pair_metrics(out))


def check_align(align: AlignConfig) -> None:
    """Hyper-parameters that make no sense for the chosen loss fail before any step."""
    if align.beta <= 0:
        raise ConfigError(f"align.beta must be > 0, got {align.beta}")
    if str(align.loss) == "cdpo" and not 0 < align.label_smoothing < 0.5:
        raise ConfigError(f"align.label_smoothing must be in (0, 0.5) for cdpo, got {align.label_smoothing}")
    if str(align.loss) != "cdpo" and align.label_smoothing:
        raise ConfigError(f"align.label_smoothing applies to loss cdpo only, not {align.loss}")


def build(ctx: ObjectiveContext) -> PreferenceObjective:
    """The objective, with its reference: built and frozen (live) or scored once into the shard
    directories before the data loader opens them (precomputed)."""
    from trainer.reference import live_reference, precompute_reference

    align = ctx.cfg.align
    check_align(align)
    chunk_size = ctx.cfg.train.loss_chunk_size
    if str(align.loss) in REFERENCE_FREE:
        return PreferenceObjective(align, None, chunk_size)
    if str(align.reference) == "precomputed":
        precompute_reference(ctx)
        return PreferenceObjective(align, None, chunk_size)
    return PreferenceObjective(align, live_reference(ctx), chunk_size)
