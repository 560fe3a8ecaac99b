"""PPO (``align.loss=ppo``): RLHF as InstructGPT did it, on the rollouts of :mod:`online`.

Each step samples ``align.num_generations`` completions per prompt (1 is enough: PPO needs no
group) and scores them with ``align.reward`` (typically a reward-model checkpoint). One forward of
the sampling policy gives the old log-probs and the value head's values (:mod:`value_head`: a scalar
head on the shared trunk); the reference's log-probs make the KL-shaped per-token rewards (the
score on the last completion token, -β·KL on each); GAE(γ, λ) gives advantages and returns, the
advantages whitened over the step's whole rollout on every rank. ``align.num_iterations`` updates
(PPO's epochs) then train on the same rollout with the clipped policy loss plus ``vf_coef`` times
the clipped value loss (closed forms in :mod:`policy_gradient`), normalised by the global batch's
completion tokens.

TRL's PPOTrainer (trl/experimental/ppo/ppo_trainer.py at f2cd577) is the reference for the pieces;
where we differ: the score sits on the completion's last token (TRL adds it one position later,
``sequence_lengths + 1``), the value loss covers the completion tokens alone, whitening is global
rather than per rank, and one update is one optimizer step over the whole rollout (TRL also splits it
into ``num_mini_batches``). OpenRLHF (openrlhf/models/utils.py ``compute_reward``,
trainer/ppo_utils/experience_maker.py ``get_advantages_and_returns``, models/loss.py ``ValueLoss`` at
3c3be62) puts the score on the last token as we do, and whitens over its rank's rollout.

Metrics with TRL's names: ``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
``objective/rlhf_reward``, ``objective/scores``, ``loss/policy_avg``, ``loss/value_avg``,
``policy/clipfrac_avg``, ``policy/approxkl_avg``, ``val/clipfrac_avg``, ``val/ratio``; ``val/vpred``
(the mean value prediction, legacy TRL's ``ppo/val/vpred``); and ours: ``reward``, ``kl`` (per token),
``entropy``, ``clip_ratio/*``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from trainer.distributed import all_reduce, unwrap
from trainer.objectives import Batch, LossOutput, ObjectiveContext
from trainer.objectives.online import OnlineObjective, objective_parts
from trainer.objectives.policy_gradient import gae, kl_shaped_rewards, masked_whiten, ppo_loss
from trainer.objectives.value_head import ValueFunction, ValueHead
from trainer.rollout import Completions, token_logps


def policy_and_values(model: torch.nn.Module, value_head: ValueHead, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, prompt_length: int, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per completion token [N, C]: log-probs, entropies and values V(s_t) (read at the position that
    predicts token t, as the logits), from one forward; both heads run inside it (``head_loss``), where
    sharded strategies have the LM head's weight gathered."""
    def heads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden[:, prompt_length - 1 : -1]
        return F.linear(hidden, weight, bias), value_head(hidden)

    logits, values = model(input_ids, attention_mask=attention_mask, head_loss=heads)
    logps, entropy = token_logps(logits, input_ids[:, prompt_length:], temperature, with_entropy)
    return logps, entropy, values


class PPOObjective(OnlineObjective):
    """Online rollouts; GAE on KL-shaped rewards against a value head; the clipped policy and value losses."""

    def __init__(self, value: ValueFunction, **parts: Any) -> None:
        super().__init__(**parts)
        self.value = value
        self.token_units = True

    def rollout(self, model: torch.nn.Module, draw: Callable[[], list[Batch]], train: bool = True
                ) -> tuple[list[Batch], dict[str, float]]:
        self.value.step()  # the last step's value-head gradients, before its values are read again
        return super().rollout(model, draw, train)

    @torch.no_grad()
    def attach(self, completions: Completions, rewards: torch.Tensor) -> Batch:
        """Old log-probs and values of the sampling policy, KL-shaped rewards, GAE (advantages whitened
        later, over the whole rollout, by :meth:`finish`)."""
        align, mask = self.align, completions.completion_mask
        with self.strategy.autocast():
            logps, _, values = policy_and_values(self.strategy.model, self.value.head, completions.input_ids,
                                                 completions.attention_mask, completions.prompt_length,
                                                 align.temperature)
        ref_logps = self.logps(self.reference, completions).double() if self.reference is not None else None
        scores = rewards.to(mask.device)
        token_rewards, kl = kl_shaped_rewards(scores, logps.double(), ref_logps, mask, align.beta)
        advantages, returns = gae(token_rewards, values.double(), mask, align.gamma, align.lam)
        return {"input_ids": completions.input_ids, "attention_mask": completions.attention_mask,
                "completion_mask": mask, "prompt_length": torch.tensor(completions.prompt_length),
                "rewards": rewards.float(), "old_logps": logps.float(), "old_values": values.float(),
                "advantages": advantages.float(), "returns": returns.float(), "kl": kl.float()}

    def finish(self, batches: list[Batch]) -> dict[str, float]:
        """Whiten the advantages over every completion token of the step (all micro-batches and ranks);
        TRL's rollout metrics, means over the global batch's completions."""
        copies = self.strategy.data_copies  # tensor-parallel ranks hold the same rollout

        def sums(x: torch.Tensor) -> torch.Tensor:
            return all_reduce(x.to(self.device)) / copies

        masks = [b["completion_mask"].bool() for b in batches]
        flat = torch.cat([b["advantages"][m].double() for b, m in zip(batches, masks)])
        whitened = masked_whiten(flat, torch.ones_like(flat), sums).split([int(m.sum()) for m in masks])
        for batch, mask, values in zip(batches, masks, whitened):
            batch["advantages"] = torch.zeros_like(batch["advantages"]).masked_scatter(mask, values.float())
        n, kl, entropy, scores = sums(torch.stack([
            torch.tensor(sum(b["rewards"].numel() for b in batches), dtype=torch.float64),
            sum(b["kl"].double().sum() for b in batches).cpu(),
            sum((-b["old_logps"].double() * b["completion_mask"]).sum() for b in batches).cpu(),
            sum(b["rewards"].double().sum() for b in batches).cpu(),
        ])).tolist()
        non_score = -self.align.beta * kl / n
        return {"objective/kl": kl / n, "objective/entropy": entropy / n, "objective/non_score_reward": non_score,
                "objective/scores": scores / n, "objective/rlhf_reward": scores / n + non_score}

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        align, mask = self.align, batch["completion_mask"]
        logps, entropy, values = policy_and_values(model, self.value.head, batch["input_ids"], batch["attention_mask"],
                                                   int(batch["prompt_length"]), align.temperature, with_entropy=True)
        out = ppo_loss(logps, values, mask, old_logps=batch["old_logps"], old_values=batch["old_values"],
                       advantages=batch["advantages"], returns=batch["returns"], epsilon=align.epsilon,
                       epsilon_high=align.epsilon_high, cliprange_value=align.cliprange_value, vf_coef=align.vf_coef)
        if torch.is_grad_enabled():
            self.value.pending = True
        tokens, sequences = mask.sum().double(), torch.tensor(float(mask.shape[0]), device=mask.device)
        ratios = {**out.ratios, "entropy": ((entropy.detach() * mask).sum(), tokens),
                  "reward": (batch["rewards"].sum(), sequences), "kl": (batch["kl"].sum(), tokens)}
        return LossOutput(loss_sum=out.loss_sum, count=out.units, ratios=ratios)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "value": self.value.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.value.load_state_dict(state["value"])


def build(ctx: ObjectiveContext) -> PPOObjective:
    config = unwrap(ctx.model).config
    if str(config.arch) != "decoder":
        raise ConfigError(f"align.loss=ppo trains a decoder policy, not model.arch={config.arch}")
    train, env = ctx.cfg.train, ctx.strategy.env
    value = ValueFunction(config.d_model, train, ctx.cfg.align.value_lr or train.lr, env.device, env.world_size)
    return PPOObjective(value, **objective_parts(ctx))
