"""Online alignment (``align.loss`` grpo, rloo or online_dpo; :mod:`ppo` builds on it): each step
samples ``align.num_generations`` completions per prompt from the current policy, scores them with
``align.reward``, turns the scores into advantages and trains on the clipped policy-gradient loss of
:mod:`policy_gradient` (online_dpo: two completions per prompt, the better one by reward chosen,
the sigmoid DPO loss against the reference, as TRL's OnlineDPOTrainer).

:meth:`OnlineObjective.rollout` runs before the loop counts units, so the loss is normalised by the
global number of sequences (grpo, dr_grpo, rloo) or completion tokens (dapo), as TRL does. The
sampler is a ``torch.Generator`` seeded with ``train.seed + data rank`` whose state is saved with each
rank's checkpoint state: a resumed run samples the same completions. Evaluation samples with a
generator seeded afresh each time, so it neither shifts the training samples nor varies between
evaluations. Metrics carry TRL's names: ``reward``, ``reward_std``, ``rewards/<name>/mean|std``,
``frac_reward_zero_std``, ``kl``, ``entropy``, ``clip_ratio/{low,high,region}_mean``,
``completions/{mean,min,max}_length``, ``completions/clipped_ratio``, and ``time/generation_s``
beside the loop's ``time/rollout_s`` and ``time/training_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from common.errors import ConfigError
from data.collate import prompt_records
from trainer.config import AlignLoss, ScaleRewards
from trainer.distributed import all_gather_object, unwrap
from trainer.objectives import Batch, LossOutput, ObjectiveContext
from trainer.objectives.pairs import PairLogps
from trainer.objectives.policy_gradient import (
    group_advantages,
    grpo_loss,
    kl_penalised,
    leave_one_out_advantages,
    rloo_loss,
)
from trainer.objectives.preference import pair_metrics, preference_losses
from trainer.rewards import Rewards, build_rewards
from trainer.rollout import completion_logps, sample_completions

if TYPE_CHECKING:
    from trainer.config import AlignConfig
    from trainer.strategy import Strategy

EVAL_SEED_OFFSET = 1 << 20  # evaluation's sampler: far from any training rank's seed


class OnlineObjective:
    """Prompts in, rollouts made by :meth:`rollout`, the policy-gradient loss on them."""

    data_objective = "prompt"

    def __init__(self, align: AlignConfig, rewards: Rewards, tokenizer: Any, strategy: Strategy,
                 reference: torch.nn.Module | None, seed: int) -> None:
        self.align, self.rewards, self.tokenizer, self.strategy = align, rewards, tokenizer, strategy
        self.reference = reference
        self.seed = seed + strategy.data_rank  # tensor-parallel ranks share a batch: they sample alike
        self.device = strategy.env.device
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        self.stop_ids = sorted({tokenizer.eos_id, tokenizer.end_id})
        self.token_units = align.loss is AlignLoss.grpo and align.loss_aggregation.token_units
        self.reused: dict[str, Any] | None = None  # a rollout serving num_iterations updates

    # -- rollouts -----------------------------------------------------------------------------------

    def rollout(self, model: torch.nn.Module, draw: Callable[[], list[Batch]], train: bool = True
                ) -> tuple[list[Batch], dict[str, float]]:
        """Sample, score and attach advantages (and reference log-probs) to every micro-batch of
        ``draw()``; in training, a rollout serves ``align.num_iterations`` steps (TRL's μ), the later
        ones without drawing, against the log-probs of the policy that sampled it."""
        if train and self.reused is not None and self.reused["uses"] < self.align.num_iterations:
            self.reused["uses"] += 1
            return self.reused["batches"], {**self.reused["metrics"], "time/generation_s": 0.0}
        generator = self.generator if train else torch.Generator(self.device).manual_seed(self.seed + EVAL_SEED_OFFSET)
        out, stats, generation_s = [], [], 0.0
        for batch in draw():
            started = time.perf_counter()
            ids, mask = batch["prompt_input_ids"].to(self.device), batch["prompt_attention_mask"].to(self.device)
            with self.strategy.autocast():
                completions = sample_completions(
                    model, ids, mask, num_generations=self.align.num_generations,
                    max_new_tokens=self.align.max_new_tokens, temperature=self.align.temperature,
                    top_p=self.align.top_p, stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_id,
                    generator=generator, stop_when_done=not self.strategy.cfg.strategy.shards_parameters,
                )
            generation_s += time.perf_counter() - started
            per_function = self.score(batch, ids, mask, completions)
            rolled = self.attach(completions, self.rewards.total(per_function))
            out.append(rolled)
            stats.append({"rewards": per_function, "lengths": completions.completion_mask.sum(1).cpu(),
                          "truncated": completions.truncated.cpu()})
        metrics = self.metrics(stats) | self.finish(out)
        if train and self.align.num_iterations > 1:
            for rolled in out:  # the sampling policy's log-probs, for the ratio of the later updates
                if "old_logps" in rolled:
                    continue
                with torch.no_grad(), self.strategy.autocast():
                    rolled["old_logps"], _ = completion_logps(self.strategy.model, rolled["input_ids"],
                                                              rolled["attention_mask"], int(rolled["prompt_length"]),
                                                              self.align.temperature)
            self.reused = {"batches": out, "metrics": metrics, "uses": 1}
        return out, metrics | {"time/generation_s": generation_s}

    def finish(self, batches: list[Batch]) -> dict[str, float]:
        """Hook: what needs a step's whole rollout (PPO whitens its advantages over it); extra metrics."""
        return {}

    def score(self, batch: Batch, ids: torch.Tensor, mask: torch.Tensor, completions: Any) -> torch.Tensor:
        """Per-function rewards [N, F] of the decoded completions against their prompts' records."""
        group = self.align.num_generations
        records = [r for r in prompt_records(batch) for _ in range(group)]
        prompts = [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                   for row, m in zip(ids, mask)]
        texts = [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                 for row, m in zip(completions.completion_ids, completions.completion_mask)]
        attention = torch.cat([completions.attention_mask[:, : completions.prompt_length],
                               completions.completion_mask], 1)  # what a reward model scores: up to the stop
        return self.rewards.score([p for p in prompts for _ in range(group)], texts, [r for _, r in records],
                                  [name for name, _ in records], tokens=(completions.input_ids, attention))

    @torch.no_grad()
    def attach(self, completions: Any, rewards: torch.Tensor) -> Batch:
        """The training batch: sequences, masks, advantages, and what the KL term needs."""
        align, group = self.align, self.align.num_generations
        batch = {"input_ids": completions.input_ids, "attention_mask": completions.attention_mask,
                 "completion_mask": completions.completion_mask,
                 "prompt_length": torch.tensor(completions.prompt_length), "rewards": rewards.float()}
        ref_logps = self.logps(self.reference, completions) if self.reference is not None else None
        if align.loss is AlignLoss.online_dpo:
            batch["ref_logps"] = ref_logps
            batch["chosen_index"], batch["rejected_index"] = pair_by_reward(rewards)
            return batch
        if align.loss is AlignLoss.grpo:
            advantages = group_advantages(rewards, group, scale=align.scale_rewards is ScaleRewards.group)
            if ref_logps is not None:
                batch["ref_logps"] = ref_logps
        else:
            if ref_logps is not None:  # RLOO's KL is a reward penalty from the sampling policy's log-probs
                old_logps = self.logps(self.strategy.model, completions)
                rewards, kl = kl_penalised(rewards, old_logps.double(), ref_logps.double(),
                                           completions.completion_mask, align.beta)
                batch["kl"] = kl.float()
            advantages = leave_one_out_advantages(rewards, group, normalize=align.normalize_advantages)
        batch["advantages"] = advantages.float()
        return batch

    def logps(self, model: torch.nn.Module, completions: Any) -> torch.Tensor:
        with self.strategy.autocast():
            logps, _ = completion_logps(model, completions.input_ids, completions.attention_mask,
                                        completions.prompt_length, self.align.temperature)
        return logps

    def metrics(self, stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """TRL's rollout metrics over every rank's completions of this step."""
        merged = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
        every = all_gather_object(merged)[:: self.strategy.data_copies]  # tensor-parallel copies once
        per_function = torch.cat([g["rewards"] for g in every])
        lengths = torch.cat([g["lengths"] for g in every]).double()
        truncated = torch.cat([g["truncated"] for g in every])
        total = self.rewards.total(per_function)
        out = {
            "reward_std": total.std().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": truncated.double().mean().item(),
        }
        if self.align.num_generations > 1:
            grouped_std = total.view(-1, self.align.num_generations).std(1)
            zero_std = torch.isclose(grouped_std, torch.zeros_like(grouped_std))
            out["frac_reward_zero_std"] = zero_std.double().mean().item()
        for j, name in enumerate(self.rewards.names):
            out[f"rewards/{name}/mean"] = per_function[:, j].mean().item()
            out[f"rewards/{name}/std"] = per_function[:, j].std().item()
        return out

    # -- the loss -----------------------------------------------------------------------------------

    def count(self, batch: Batch) -> int:
        mask = batch["completion_mask"]
        if self.align.loss is AlignLoss.online_dpo:
            return int(batch["chosen_index"].shape[0])
        return int(mask.sum()) if self.token_units else int(mask.shape[0])

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        align, mask = self.align, batch["completion_mask"]
        logps, entropy = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                          int(batch["prompt_length"]), align.temperature, with_entropy=True)
        if align.loss is AlignLoss.online_dpo:
            return self.pair_loss(logps, entropy, batch)
        if align.loss is AlignLoss.grpo:
            out = grpo_loss(logps, batch["advantages"], mask, old_logps=batch.get("old_logps"),
                            ref_logps=batch.get("ref_logps"), beta=align.beta,
                            epsilon=align.epsilon, epsilon_high=align.epsilon_high,
                            aggregation=align.loss_aggregation, max_new_tokens=align.max_new_tokens)
        else:
            out = rloo_loss(logps, batch["advantages"], mask, old_logps=batch.get("old_logps"),
                            epsilon=align.epsilon, epsilon_high=align.epsilon_high)
        tokens, sequences = mask.sum().double(), torch.tensor(float(mask.shape[0]), device=mask.device)
        ratios = dict(out.ratios)
        ratios["entropy"] = ((entropy.detach() * mask).sum(), tokens)
        ratios["reward"] = (batch["rewards"].sum(), sequences)
        if "kl" in batch:
            ratios["kl"] = (batch["kl"].sum(), tokens)
        return LossOutput(loss_sum=out.loss_sum, count=out.units, ratios=ratios)

    def pair_loss(self, logps: torch.Tensor, entropy: torch.Tensor, batch: Batch) -> LossOutput:
        """Online DPO: the sigmoid DPO loss on each prompt's (better, worse) completions, with TRL's metrics."""
        mask = batch["completion_mask"]
        sums, ref_sums, tokens = (logps * mask).sum(1), (batch["ref_logps"] * mask).sum(1), mask.sum(1)
        chosen, rejected = batch["chosen_index"], batch["rejected_index"]
        policy = PairLogps(sums[chosen], sums[rejected], tokens[chosen], tokens[rejected])
        reference = PairLogps(ref_sums[chosen], ref_sums[rejected], tokens[chosen], tokens[rejected])
        out = preference_losses(policy, reference, loss="dpo", beta=self.align.beta)
        pairs = torch.tensor(float(chosen.shape[0]), device=logps.device)
        ratios = {"entropy": ((entropy.detach() * mask).sum(), mask.sum().double()),
                  "reward": (batch["rewards"].sum(), 2 * pairs)}
        return LossOutput(loss_sum=out.losses.sum(), count=pairs, metrics=pair_metrics(out), ratios=ratios)

    # -- checkpointed state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sampler": self.generator.get_state()}
        if self.reused is not None and self.reused["uses"] < self.align.num_iterations:  # mid-reuse
            state["reused"] = {"batches": [{k: v.cpu() for k, v in b.items()} for b in self.reused["batches"]],
                               "metrics": self.reused["metrics"], "uses": self.reused["uses"]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["sampler"])
        self.reused = state.get("reused")


def pair_by_reward(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) row indices of each prompt's two completions (adjacent rows): the higher
    reward is chosen, the first on a tie, as TRL's OnlineDPOTrainer (trl/experimental/online_dpo)."""
    first, second = rewards.view(-1, 2).unbind(1)
    base = torch.arange(first.shape[0]) * 2
    first_wins = (first >= second).long()
    return base + 1 - first_wins, base + first_wins


def check_lengths(ctx: ObjectiveContext) -> None:
    """The longest prompt (data.seq_len tokens) plus max_new_tokens must fit the model's positions."""
    config = unwrap(ctx.model).config
    longest = ctx.cfg.data.seq_len + ctx.cfg.align.max_new_tokens
    if not config.covers(longest):
        raise ConfigError(
            f"align.max_new_tokens={ctx.cfg.align.max_new_tokens} after prompts of up to data.seq_len="
            f"{ctx.cfg.data.seq_len} tokens exceeds model.max_seq_len={config.max_seq_len}; lower one of them"
        )


def objective_parts(ctx: ObjectiveContext) -> dict[str, Any]:
    """What every online objective is built from. Rewards resolved (and user modules imported) before any
    step; the reference, when β > 0, is a frozen copy of the starting model held by the strategy like the
    policy."""
    from trainer.reference import live_reference

    align = ctx.cfg.align
    check_lengths(ctx)
    return {"align": align, "rewards": build_rewards(align.reward, align.reward_weights), "tokenizer": ctx.tokenizer,
            "strategy": ctx.strategy, "reference": live_reference(ctx) if align.beta else None,
            "seed": ctx.cfg.train.seed}


def build(ctx: ObjectiveContext) -> OnlineObjective:
    return OnlineObjective(**objective_parts(ctx))
