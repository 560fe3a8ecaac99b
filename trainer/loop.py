"""The training loop: one optimizer step = accumulation micro-batches on every rank, then a step.

Read :meth:`Trainer.train_step` top to bottom; side jobs (evaluation, checkpoints, preemption,
logging) are callbacks called after each step.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import dump_yaml, read_yaml
from common.errors import UserError
from model.moe import moe_layers, pop_router_stats
from trainer import checkpoint, evaluation
from trainer.callbacks import Callback
from trainer.config import RunConfig
from trainer.distributed import DistEnv, all_reduce
from trainer.guard import LossGuard, TrainingDiverged
from trainer.metrics import memory_gb, mfu, peak_flops
from trainer.objectives import Batch, LossOutput, Objective
from trainer.schedule import lr_at
from trainer.strategy import Strategy

log = logging.getLogger("tessera.trainer")


@dataclasses.dataclass
class ModelSpec:
    """How to rebuild the plain model for the consolidated ``model/`` directory of a checkpoint."""

    config: Any  # model.config.ModelConfig
    head: str
    tokenizer_dir: Path | None  # its files are copied beside the weights
    adapter_base: Any = None  # model.io.AdapterBase: a LoRA run's model directory holds the adapter alone


def input_tokens(batch: Batch) -> int:
    """Tokens fed to the model (for throughput): every ``*input_ids`` tensor."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


def numpy_rng_state() -> list[Any]:
    """NumPy's state with its key array as a tensor, so rank files load with ``weights_only=True``."""
    kind, keys, *rest = np.random.get_state()  # rest: position, has_gauss, cached gaussian (plain numbers)
    return [kind, torch.from_numpy(keys.astype(np.int64)), *rest]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        callbacks: Sequence[Callback] = (),
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
        self.callbacks = list(callbacks)
        self.writer = checkpoint.CheckpointWriter(cfg.checkpoint_dir, cfg.checkpoint.keep_last, env)
        self.guard = LossGuard(cfg.train.max_bad_steps, cfg.train.spike_factor)
        self.peak_flops = peak_flops(env.device, cfg.log.peak_tflops)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self.last_saved: Path | None = None
        self.last_saved_step = -1
        self.warned_valid_skips = False
        self.stop_reason: str | None = None

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> None:
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

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint of this step (all ranks call it together)."""
        if self.last_saved_step == self.step:
            return self.last_saved
        weights = self.strategy.full_state_dict()
        self.refuse_non_finite(weights)
        try:
            self.last_saved = self._write_checkpoint(weights)
        except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
            if not self.writer.out_of_space(exc):
                raise
            raise self.writer.disk_full(self.step, self.last_saved) from None
        self.last_saved_step = self.step
        return self.last_saved

    def _write_checkpoint(self, weights: dict[str, torch.Tensor] | None) -> Path:
        tmp = self.writer.begin(self.step)
        self.strategy.save(tmp)
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        if hasattr(self.objective, "state_dict"):  # e.g. the rollout sampler's RNG
            rank_state["objective"] = self.objective.state_dict()
        buffer = io.BytesIO()  # written by Python, so a full disk is an OSError, not torch's "unexpected pos"
        torch.save(rank_state, buffer)
        (tmp / checkpoint.rank_file(self.env.rank)).write_bytes(buffer.getbuffer())
        if self.env.is_main:
            from model.io import STEP_MODEL_DIR

            self.write_model_dir(weights, tmp / STEP_MODEL_DIR)
            dump_yaml(self.cfg, tmp / "config.yaml")
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.env.world_size,
            "data_copies": self.strategy.data_copies,  # tensor-parallel ranks sharing one loader state
            "strategy": str(self.cfg.train.strategy),
            "format": self.strategy.checkpoint_format,
            "guard": self.guard.state_dict(),
        }
        return self.writer.commit(tmp, self.step, state)

    def refuse_non_finite(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Stop every rank, before anything is written, when the gathered weights (rank 0's) hold nan/inf."""
        from model.io import non_finite

        bad = non_finite(weights) if self.env.is_main else []
        if all_reduce(torch.tensor([len(bad)], device=self.env.device)).item():
            last = f"the last one is {self.last_saved.name}" if self.last_saved else "there is none yet"
            what = f"{len(bad)} of {len(weights)} weight tensors hold nan or inf (first: {bad[0]})" if bad else \
                "the weights hold nan or inf"
            raise TrainingDiverged(f"step {self.step}: {what}; no checkpoint was written ({last}); "
                                   "lower train.lr or check the data")

    def write_model_dir(self, weights: dict[str, torch.Tensor], out: Path) -> None:
        """The consolidated model (what ``model.init``, generate and export load; a LoRA run's adapter
        alone) + tokenizer files."""
        from model import build_model
        from model.io import save_pretrained

        if self.model_spec.adapter_base is not None:
            from model.io import save_adapter
            from model.lora import is_adapter_key

            save_adapter({k: v for k, v in weights.items() if is_adapter_key(k)}, self.cfg.lora,
                         self.model_spec.adapter_base, out)
        else:
            with torch.device("meta"):  # no init, no memory: the gathered weights are assigned as they are
                plain = build_model(self.model_spec.config, head=self.model_spec.head)
            plain.load_state_dict(weights, assign=True)
            save_pretrained(plain, out)
        tokenizer_dir = self.model_spec.tokenizer_dir
        if tokenizer_dir is not None:
            for path in tokenizer_dir.iterdir():
                if path.is_file() and path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy2(path, out / path.name)

    def check_adapter_base(self, path: Path) -> None:
        """A LoRA checkpoint holds the adapter alone: resuming it on another base than its own would
        silently train something else, so the base's hash must match the one the checkpoint records."""
        from model.io import ADAPTER_CONFIG, STEP_MODEL_DIR

        saved = path / STEP_MODEL_DIR / ADAPTER_CONFIG
        base = self.model_spec.adapter_base
        if base is None and not saved.is_file():
            return
        if base is None:
            raise UserError(f"checkpoint {path} holds a LoRA adapter; resume it with the lora section it was "
                            "trained with")
        if not saved.is_file():
            raise UserError(f"checkpoint {path} is a full model's, not a LoRA run's: resume it without lora, or "
                            "start a LoRA run from it with model.init and checkpoint.resume=never")
        recorded = read_yaml(saved)["base_sha256"]
        if recorded != base.sha256:
            raise UserError(f"checkpoint {path} adapts a base with weights sha256 {recorded[:12]}, but model.init "
                            f"{base.path} has {base.sha256[:12]}: resume it on the base it was trained on")

    def resume(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (verified), also when it was saved at another world size."""
        state = checkpoint.read_state(path)
        saved_world = state["world_size"]
        if state["format"] != self.strategy.checkpoint_format:
            raise UserError(
                f"checkpoint {path} was saved by {state['strategy']}; {self.cfg.train.strategy} cannot resume it "
                "(start from its weights with model.init and checkpoint.resume=never instead)"
            )
        self.check_adapter_base(path)
        self.strategy.load(path)
        ranks = [checkpoint.load_rank_state(path / checkpoint.rank_file(r)) for r in range(saved_world)]
        copies = state.get("data_copies", 1)
        try:
            if saved_world == self.env.world_size and copies == self.strategy.data_copies:
                self.loader.load_state_dict(ranks[self.env.rank]["loader"])
                set_rng_state(ranks[self.env.rank]["rng"])
                if "objective" in ranks[self.env.rank]:
                    self.objective.load_state_dict(ranks[self.env.rank]["objective"])
            else:  # the loader continues with exactly the units no old data rank consumed
                self.loader.load_state_dict([r["loader"] for r in ranks[::copies]])
        except UserError as e:
            raise UserError(f"checkpoint {path}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"checkpoint {path}: the rank files' loader or RNG state is damaged "
                            f"({type(e).__name__}: {e}); the checkpoint cannot be resumed") from None
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.guard.load_state_dict(state["guard"])
        self.last_saved, self.last_saved_step = path, self.step
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, self.step)

