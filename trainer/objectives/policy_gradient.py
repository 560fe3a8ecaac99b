"""The losses of online alignment on sampled completions: GRPO (with its Dr. GRPO and DAPO
aggregations), RLOO and PPO, as closed forms over per-token log-probs.

The definitions follow TRL (huggingface/trl at f2cd577, July 2026): ``trl/trainer/grpo_trainer.py``
(``_generate_and_score_completions`` for the advantages, ``_compute_loss`` for the loss) and
``trl/trainer/rloo_trainer.py`` (the same two methods). With π, π_old, π_ref the per-token
log-probs of the policy, the policy that sampled, and the reference; r = exp(π - π_old); A the
advantage of the completion; m the completion mask (tokens up to and including the first stop):

  GRPO  A_i = (R_i - mean_g R) / (std_g R + 1e-4)   (std unbiased, over the G completions of a prompt;
        without scaling, Dr. GRPO: A_i = R_i - mean_g R)
        ℓ_t = -min(r_t A, clip(r_t, 1-ε, 1+ε_high) A) + β·KL_t,  KL_t = exp(π_ref-π) - (π_ref-π) - 1 (k3)
        aggregation  grpo:    mean over sequences of Σ_t m ℓ / Σ_t m
                     dr_grpo: Σ m ℓ / (sequences × max_new_tokens)
                     dapo:    Σ m ℓ / (completion tokens of the whole global batch)
  RLOO  R_i ← R_i - β·Σ_t m (π_old - π_ref)   (the KL is a reward penalty, first-order estimate)
        A_i = R_i - mean of the other G-1 rewards of its prompt (optionally standardised over the batch)
        ℓ_i = -min(ρ_i A_i, clip(ρ_i, 1-ε, 1+ε_high) A_i), ρ_i = exp(Σ_t m (π - π_old)); mean over sequences

  PPO   u_t = -β·(π_old - π_ref)_t, plus the reward on the completion's last token (KL-shaped rewards)
        A = GAE(γ, λ) of u against the value head's V_old, whitened over the global batch; R = GAE + V_old
        ℓ_t = -min(r_t A_t, clip(r_t, 1-ε, 1+ε_high) A_t) + vf_coef·½·max((V-R)², (clip(V, V_old±c)-R)²)
        summed over completion tokens, divided by the global batch's completion tokens
        (``trl/experimental/ppo/ppo_trainer.py``, the rollout and PPO-epoch loops of ``train``)

Each function returns a *sum* over its units and the unit count, as the loop expects
(:mod:`trainer.objectives`): sequences for grpo, dr_grpo and rloo, completion tokens for dapo, so
the loop's division by the global count gives TRL's normalisation exactly, also across ranks and
accumulation steps.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import torch


class LossAggregation(enum.StrEnum):
    """How GRPO's per-token losses become one number (TRL's ``loss_type``)."""

    grpo = "grpo"
    dr_grpo = "dr_grpo"
    dapo = "dapo"

    @property
    def token_units(self) -> bool:
        """The loss is normalised by completion tokens (else by sequences)."""
        return self is LossAggregation.dapo


STD_EPS = 1e-4  # TRL's guard in the advantage denominators


def grouped(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if values.ndim != 1 or values.numel() % group_size:
        raise ValueError(f"{values.numel()} rewards do not split into groups of {group_size}")
    return values.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages: rewards centred on their prompt's mean, divided by its std (+1e-4) when
    ``scale`` (TRL's ``scale_rewards="group"``; ``"none"`` is Dr. GRPO). Rows of a prompt are adjacent."""
    groups = grouped(rewards, group_size)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(1, keepdim=True) + STD_EPS)
    return advantages.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False) -> torch.Tensor:
    """RLOO's advantages: each reward minus the mean of the other ``group_size - 1`` of its prompt;
    ``normalize`` standardises them over the batch (TRL's ``normalize_advantages``)."""
    groups = grouped(rewards, group_size)
    baselines = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    advantages = (groups - baselines).reshape(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + STD_EPS)
    return advantages


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π ‖ π_ref) per token: exp(Δ) - Δ - 1 with Δ = π_ref - π (≥ 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A micro-batch's summed loss over ``units`` (sequences or tokens), plus the sums behind TRL's
    training metrics, each with the count it is a mean over (``ratios``)."""

    loss_sum: torch.Tensor
    units: torch.Tensor
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _clip_ratios(coef: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
                 epsilon_high: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TRL's clip_ratio/low_mean, high_mean and region_mean: the masked share of ratios clipped on the
    side where clipping changes the gradient."""
    low = (coef < 1 - epsilon) & (advantages < 0)
    high = (coef > 1 + epsilon_high) & (advantages > 0)
    count = mask.sum()
    return {
        "clip_ratio/low_mean": ((low * mask).sum(), count),
        "clip_ratio/high_mean": ((high * mask).sum(), count),
        "clip_ratio/region_mean": (((low | high) * mask).sum(), count),
    }


def clipped_surrogate(coef: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float
                      ) -> torch.Tensor:
    """-min(ρA, clip(ρ, 1-ε, 1+ε_high)A), PPO's pessimistic bound."""
    return -torch.min(coef * advantages, coef.clamp(1 - epsilon, 1 + epsilon_high) * advantages)


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None, beta: float = 0.0,
              epsilon: float = 0.2, epsilon_high: float | None = None,
              aggregation: LossAggregation = LossAggregation.grpo, max_new_tokens: int | None = None) -> PolicyLoss:
    """GRPO on ``[sequences, completion tokens]`` log-probs; ``old_logps`` None means on-policy
    (TRL's single-iteration case: π_old = π detached, so every ratio is 1)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    coef = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    per_token = clipped_surrogate(coef, adv, epsilon, epsilon_high)
    ratios = _clip_ratios(coef, adv, mask, epsilon, epsilon_high)
    if beta:
        if ref_logps is None:
            raise ValueError("a KL term (beta > 0) needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        ratios["kl"] = ((kl.detach() * mask).sum(), mask.sum())
    masked = (per_token * mask).sum(1)
    sequences = torch.tensor(float(logps.shape[0]), device=logps.device)
    if aggregation is LossAggregation.grpo:
        return PolicyLoss((masked / mask.sum(1).clamp(min=1)).sum(), sequences, ratios)
    if aggregation is LossAggregation.dr_grpo:
        if not max_new_tokens:
            raise ValueError("dr_grpo normalises by max_new_tokens; give it")
        return PolicyLoss(masked.sum() / max_new_tokens, sequences, ratios)
    return PolicyLoss(masked.sum(), mask.sum(), ratios)


def rloo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None
              ) -> PolicyLoss:
    """RLOO's sequence-level clipped loss (its KL is already in the rewards: :func:`kl_penalised`)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    sequence_logps = (logps * mask).sum(1)
    old = sequence_logps.detach() if old_logps is None else (old_logps * mask).sum(1)
    coef = torch.exp(sequence_logps - old)
    adv = advantages.to(logps.dtype)
    losses = clipped_surrogate(coef, adv, epsilon, epsilon_high)
    ones = torch.ones_like(losses)
    ratios = _clip_ratios(coef, adv, ones, epsilon, epsilon_high)
    return PolicyLoss(losses.sum(), ones.sum(), ratios)


def kl_penalised(rewards: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's rewards with the sequence KL penalty R - β·Σ_t m (π_old - π_ref), and that KL per sequence."""
    kl = ((old_logps - ref_logps) * mask.to(old_logps.dtype)).sum(1)
    return rewards - beta * kl.to(rewards.dtype), kl


# -- PPO (RLHF as InstructGPT did it): KL-shaped per-token rewards, GAE, whitening, clipped value loss --------


def kl_shaped_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token rewards [N, C]: -β·KL_t on every completion token (k1: π_old - π_ref, TRL's default
    ``kl_estimator``), plus the completion's score on its last token; and the KL_t itself (0 off the mask
    and without a reference)."""
    mask = mask.to(logps.dtype)
    kl = (logps - ref_logps) * mask if ref_logps is not None else torch.zeros_like(logps)
    rewards = -beta * kl
    last = mask.sum(1).long().clamp(min=1) - 1  # the stop token, or the last one of a truncated completion
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's masked prefix (the value after the last token
    is 0): δ_t = r_t + γ·V_{t+1} - V_t, A_t = Σ_k (γλ)^k δ_{t+k}; returns (A, A + V), 0 off the mask.
    Written as one product with the discount matrix W[k, t] = (γλ)^(k-t) (k ≥ t), not a loop over t."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = (rewards + gamma * next_values - values) * mask
    steps = torch.arange(values.shape[1], device=values.device)
    lag = steps[:, None] - steps[None, :]  # k - t
    weights = torch.where(lag >= 0, torch.tensor(gamma * lam, dtype=values.dtype, device=values.device)
                          .pow(lag.clamp(min=0).to(values.dtype)), torch.zeros((), dtype=values.dtype))
    advantages = (deltas @ weights) * mask
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, sums: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                  ) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, var unbiased, 0 off the mask, as TRL's
    ``masked_whiten``; ``sums`` adds partial sums over the other ranks (and micro-batches) so the
    statistics are the global batch's."""
    mask = mask.to(values.dtype)
    count, total = sums(torch.stack([mask.sum(), (values * mask).sum()]))
    mean = total / count
    squares = sums(((values - mean) ** 2 * mask).sum())
    var = squares / (count - 1) if count > 1 else torch.zeros_like(squares)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_loss(logps: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, old_logps: torch.Tensor,
             old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, epsilon: float = 0.2,
             epsilon_high: float | None = None, cliprange_value: float = 0.2, vf_coef: float = 0.1) -> PolicyLoss:
    """Per completion token, summed over the mask (the loop divides by the global token count):

      policy  -min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε_high) A_t),  ρ_t = exp(π - π_old)
      value   ½·max((V - R)², (clip(V, V_old - c, V_old + c) - R)²)
      loss    policy + vf_coef · value
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    coef = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype)
    policy = clipped_surrogate(coef, adv, epsilon, epsilon_high)
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    value = 0.5 * torch.max(unclipped_error, clipped_error)
    tokens = mask.sum()

    def mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ((x.detach().to(mask.dtype) * mask).sum(), tokens)

    ratios = _clip_ratios(coef, adv, mask, epsilon, epsilon_high)
    ratios.update({
        "loss/policy_avg": mean(policy),
        "loss/value_avg": mean(value),
        "policy/clipfrac_avg": mean(policy > -coef * adv),  # TRL: pg_losses2 > pg_losses
        "val/clipfrac_avg": mean(clipped_error > unclipped_error),
        "policy/approxkl_avg": mean(0.5 * (logps - old_logps) ** 2),
        "val/ratio": mean(coef),
        "val/vpred": mean(values),
    })
    return PolicyLoss(((policy + vf_coef * value) * mask).sum(), tokens, ratios)
