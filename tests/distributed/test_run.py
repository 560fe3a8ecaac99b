"""A whole run as a user sees it: run directory, metrics, W&B, checkpoints, preemption, bad input."""

from __future__ import annotations

import json
import os
import signal

import pytest
from runs import tiny_config, train
from spawn import RanksFailed, spawn

from trainer.callbacks import Callback

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb"}


def test_run_directory_metrics_wandb_and_init_from_checkpoint(corpus, tmp_path):
    raw = tiny_config(corpus, tmp_path / "run", "train.max_steps=6", "train.eval_every=3", "train.eval_steps=2",
                      "log.wandb=true", "log.wandb_run_name=tiny", "log.wandb_tags=[ci, cpu]", "log.tensorboard=true")
    [result] = spawn(train, 1, raw)
    run_dir = tmp_path / "run"

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(m.keys() >= REQUIRED for m in lines)
    assert [m["loss"] for m in lines] == pytest.approx(result.losses)
    assert lines[0]["tokens_per_s"] > 0 and lines[-1]["tokens"] == 6 * 4 * 32
    assert [m["step"] for m in lines if "eval/loss" in m] == [3, 6]
    assert result.eval_loss == pytest.approx(lines[-1]["eval/loss"]) and lines[-1]["eval/ppl"] > 1

    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run was written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(m["step"], pytest.approx(m["loss"])) for m in lines]
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6] and "lr" in events.Tags()["scalars"]
    step_dir = run_dir / "checkpoints" / "step_000006"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step_dir.name
    for name in ("model.safetensors", "model.yaml", "tokenizer.json", "tokenizer_config.json"):
        assert (step_dir / "model" / name).is_file(), name

    init = tiny_config(corpus, tmp_path / "again", "train.max_steps=1", f"model.init={run_dir / 'checkpoints'}",
                       "train.lr=1e-9", "train.min_lr=0", "checkpoint.save_final=false")
    [again] = spawn(train, 1, init)
    assert again.losses[0] < result.losses[0] - 0.2  # starts from the trained weights, not a fresh init


class SignalAt(Callback):
    def __init__(self, step: int, rank: int, sig: int) -> None:
        self.step, self.rank, self.sig = step, rank, sig

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.step and trainer.env.rank == self.rank:
            os.kill(os.getpid(), self.sig)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_saves_and_stops_then_resumes(corpus, tmp_path, sig):
    raw = tiny_config(corpus, tmp_path, "train.strategy=ddp", "train.max_steps=6")
    rank0, rank1 = spawn(train, 2, raw, "pretrain", (SignalAt(3, rank=1, sig=sig),))
    # signalled after step 3's boundary check: the ranks agree at the next boundary, step 4
    assert rank0.preempted and rank1.preempted and rank0.steps == 4
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000004"
    rank0, _ = spawn(train, 2, raw)
    assert rank0.steps == 6 and len(rank0.losses) == 2 and not rank0.preempted


def one_line_error(raw, world_size: int = 1) -> str:
    with pytest.raises(RanksFailed) as info:
        spawn(train, world_size, raw)
    assert info.value.error is not None, str(info.value)
    name, message = info.value.error
    assert name in ("UserError", "ConfigError", "TrainingDiverged") and "\n" not in message, message
    return message


def test_single_strategy_on_several_ranks_is_refused(corpus, tmp_path):
    message = one_line_error(tiny_config(corpus, tmp_path, "train.strategy=single"), 2)
    assert "train.strategy=single trains one process, but 2 ranks were started" in message


def test_global_batch_not_divisible_by_micro_times_ranks(corpus, tmp_path):
    message = one_line_error(tiny_config(corpus, tmp_path, "train.strategy=ddp", "train.global_batch_size=12"), 2)
    assert "global_batch_size=12 is not divisible by micro_batch_size × ranks = 4 × 2" in message


def test_missing_shard_directory(corpus, tmp_path):
    message = one_line_error(tiny_config(corpus, tmp_path, f"data.train={tmp_path / 'nowhere'}"))
    assert "nowhere" in message


def test_truncated_checkpoint_is_refused(corpus, tmp_path):
    spawn(train, 1, tiny_config(corpus, tmp_path, "train.max_steps=2"))
    weights = tmp_path / "checkpoints" / "step_000002" / "model" / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(100)
    message = one_line_error(tiny_config(corpus, tmp_path, "train.max_steps=4"))
    assert "truncated" in message and "model/model.safetensors is 100 bytes" in message


@pytest.mark.parametrize("strategy", ["single", "zero2"])
def test_spike_guard_skips_counts_and_stops(corpus, tmp_path, strategy):
    # with spike_factor 0.5 every step after the first 10 counts as a spike: 2 are skipped, the 3rd stops the run
    raw = tiny_config(corpus, tmp_path, f"train.strategy={strategy}", "train.max_steps=20",
                      "train.spike_factor=0.5", "train.max_bad_steps=2")
    message = one_line_error(raw, 1 if strategy == "single" else 2)
    assert message.startswith("stopped at step 13: 3 steps skipped (last: loss spike")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["skipped"]] == [11, 12]
    assert not (tmp_path / "checkpoints").exists()  # a diverged run writes no final checkpoint


def test_zero_checkpoint_resumed_by_another_strategy_is_refused(corpus, tmp_path):
    # another world size resumes (tests/distributed/test_zero_reshard.py); another on-disk format does not
    spawn(train, 2, tiny_config(corpus, tmp_path, "train.strategy=zero2", "train.max_steps=2"))
    message = one_line_error(tiny_config(corpus, tmp_path, "train.strategy=fsdp", "train.max_steps=4"))
    assert "saved by zero2; fsdp cannot resume it" in message
