"""The training loop: one optimizer step = accumulation micro-batches on every rank, then a step.

Read :meth:`Trainer.train_step` top to bottom; side jobs (evaluation, checkpoints, preemption,
logging) are callbacks called after each step. Saving and resuming are the
:class:`~trainer.checkpoint.Checkpointer`'s: :meth:`Trainer.fit` restores through it first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.moe import moe_layers, pop_router_stats
from trainer import evaluation
from trainer.callbacks import Callback
from trainer.checkpoint import Checkpointer, ModelSpec
from trainer.config import RunConfig
from trainer.distributed import DistEnv, all_reduce
from trainer.guard import LossGuard
from trainer.metrics import memory_gb, mfu, peak_flops
from trainer.objectives import Batch, LossOutput, Objective
from trainer.schedule import lr_at
from trainer.strategy import Strategy

log = logging.getLogger("tessera.trainer")


def input_tokens(batch: Batch) -> int:
    """Tokens fed to the model (for throughput): every ``*input_ids`` tensor."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        env: DistEnv,
        strategy: Strategy,
        objective: Objective,
        loader: Any,
        *,
        model_spec: ModelSpec,
        valid_batches: Callable[[], Iterable[Batch]] | None = None,
        flops_per_token: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.strategy = strategy
        self.model = strategy.model
        self.moe_layers = moe_layers(self.model)
        self.expert_counts: torch.Tensor | None = None  # this step's assignments per MoE layer and expert
        self.objective = objective
        self.loader = loader
        self.model_spec = model_spec
        self.valid_batches = valid_batches
        self.flops_per_token = flops_per_token
        self.callbacks: list[Callback] = []  # set by the run (default_callbacks needs the trainer)
        self.checkpointer = Checkpointer(cfg, env, strategy, model_spec)
        self.guard = LossGuard(cfg.train.max_bad_steps, cfg.train.spike_factor)
        self.peak_flops = peak_flops(env.device, cfg.log.peak_tflops)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self.warned_valid_skips = False
        self.stop_reason: str | None = None

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> None:
        """Resume as checkpoint.resume says, then train to train.max_steps (or until a callback stops it)."""
        self.checkpointer.restore(self)
        for callback in self.callbacks:
            callback.on_train_start(self)
        batches = iter(self.loader)
        try:
            while self.step < self.cfg.train.max_steps and self.stop_reason is None:
                metrics = self.train_step(batches)
                for callback in self.callbacks:
                    callback.on_step_end(self, metrics)
                self.history.append(metrics)
        except BaseException:  # no final checkpoint after a failure: the ranks may no longer agree
            self.stop_reason = "error"
            raise
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self)

    def train_step(self, batches: Iterator[Batch]) -> dict[str, Any]:
        started = time.perf_counter()
        cfg, world, device = self.cfg.train, self.env.world_size, self.env.device
        def draw() -> list[Batch]:
            return [next(batches) for _ in range(self.strategy.accumulation)]

        timings: dict[str, float] = {}
        rollout_metrics: dict[str, float] = {}
        rollout = getattr(self.objective, "rollout", None)
        if rollout is not None:  # online alignment: completions sampled from the policy (maybe reused)
            micro_batches, rollout_metrics = rollout(self.model, draw, train=True)
            timings["time/rollout_s"] = time.perf_counter() - started
        else:
            micro_batches = draw()

        # the global number of loss units (tokens, pairs) is known before any forward: normalise by it
        sizes = torch.tensor(
            [sum(self.objective.count(b) for b in micro_batches), sum(input_tokens(b) for b in micro_batches)],
            dtype=torch.float64, device=device,
        )
        global_count, global_tokens = (int(x) for x in all_reduce(sizes).tolist())
        global_tokens //= self.strategy.data_copies  # tensor-parallel ranks read the same tokens
        scale = world / max(global_count, 1)

        sums = self.strategy.forward_backward(micro_batches, scale, self.loss, self.objective)
        values = sums.reduce(torch.tensor(float(global_count), dtype=torch.float64, device=device))
        loss = values.pop("loss")

        skip = self.guard.check(loss, global_count)
        lr = lr_at(self.step, cfg)
        grad_norm = self.strategy.step(lr, skip=skip is not None)
        self.balance_experts(skip is None)
        if skip is None and not np.isfinite(grad_norm):
            skip = f"gradient norm is {grad_norm}"
        self.step += 1
        self.tokens_seen += global_tokens
        self.guard.record(self.step, loss, skip)
        if skip is not None:
            log.warning("step %d skipped: %s", self.step, skip)

        elapsed = time.perf_counter() - started
        tokens_per_s = global_tokens / elapsed
        if timings:
            timings["time/training_s"] = elapsed - timings["time/rollout_s"]
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(self.flops_per_token, tokens_per_s, world, self.peak_flops),
            "memory_gb": memory_gb(device),
            "step_time_s": elapsed,
            "skipped": skip is not None,
            **values,
            **rollout_metrics,
            **timings,
        }

    def loss(self, batch: Batch) -> tuple[LossOutput, torch.Tensor | float]:
        """The objective's loss, and the MoE router losses (load balancing, z-loss) to add to it when
        back-propagating, as a sum over the micro-batch's units like the loss. The logged ``loss``
        stays the objective's; the router's terms and the load per expert go in as ``moe/*`` metrics."""
        pop_router_stats(self.moe_layers)  # drop what backward's recomputation (activation checkpointing) recorded
        out = self.objective.loss(self.model, batch)
        router = pop_router_stats(self.moe_layers)
        if router is None:
            return out, 0.0
        self.expert_counts = router.counts if self.expert_counts is None else self.expert_counts + router.counts
        units = out.count.to(router.loss.dtype)
        out.metrics.update({"moe/router_loss": router.loss.detach() * units, "moe/aux_loss": router.aux_loss * units,
                            "moe/z_loss": router.z_loss * units, "moe/dropped": router.dropped * units,
                            **{f"moe/load/{e}": share * units for e, share in enumerate(router.load)}})
        return out, router.loss * units

    def balance_experts(self, stepped: bool) -> None:
        """Aux-loss-free balancing (model.router_bias_update_rate > 0): each MoE layer's expert bias moves
        by the step's assignments summed over every rank, so all ranks keep the same biases."""
        counts, self.expert_counts = self.expert_counts, None
        if counts is None or not stepped or not any(layer.bias_update_rate for layer in self.moe_layers):
            return
        counts = all_reduce(counts)
        for layer, layer_counts in zip(self.moe_layers, counts):
            if layer.bias_update_rate:
                layer.balance(layer_counts)

    def save_checkpoint(self) -> Path:
        """Checkpoint this step (callbacks call this, on every rank together)."""
        return self.checkpointer.save(self)

    def stop(self, message: str, reason: str) -> None:
        """Ask the loop to end after this step (callbacks call this)."""
        if self.env.is_main:
            log.warning(message)
        self.stop_reason = reason

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, max_batches: int) -> dict[str, float]:
        """Mean loss (and the objective's metrics) per unit over the first ``max_batches``
        validation batches of every rank: ``{"loss": ..., "rewards/accuracies": ...}``; with validation
        shards skipped as corrupt (``data.on_corrupt=skip``) their count too (``skipped_shards``), and
        a warning line the first time."""
        self.model.eval()
        batches = self.valid_batches()
        scores = evaluation.evaluate(self.model, self.objective, batches, device=self.env.device,
                                     autocast=self.strategy.autocast, max_batches=max_batches)
        self.model.train()
        skipped = getattr(batches, "skipped_shards", [])
        if not skipped:
            return scores.means
        if self.env.is_main and not self.warned_valid_skips:
            log.warning("data.on_corrupt=skip: %d of %d validation shards skipped as corrupt (first: %s)",
                        len(skipped), batches.num_shards, skipped[0])
        self.warned_valid_skips = True
        return {**scores.means, "skipped_shards": len(skipped)}
