"""Helpers for training tests: a tiny config over the shared corpus, a rank function that trains, a stop callback."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from common.config import merge, parse_overrides
from trainer.callbacks import Callback
from trainer.config import RunConfig
from trainer.run import RunResult, run

TINY_MODELS = {
    "decoder": {"preset": "tiny-llama", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 64},
    "encoder": {"preset": "tiny-bert", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
    "encoder_decoder": {"preset": "tiny-t5", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
}


def tiny_config(corpus: Any, run_dir: Path, *overrides: str, arch: str = "decoder") -> dict[str, Any]:
    """A raw RunConfig mapping: a ~30k-parameter model, seq 32, fp32, 10 steps, no progress bar."""
    raw = {
        "model": dict(TINY_MODELS[arch]),
        "data": {"train": str(corpus.train), "valid": str(corpus.valid), "seq_len": 32, "num_workers": 0},
        "train": {"micro_batch_size": 4, "max_steps": 10, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "seed": 0, "grad_clip": 1.0},
        "checkpoint": {"keep_last": 2},
        "log": {"dir": str(run_dir), "progress": False},
    }
    return merge(raw, parse_overrides(list(overrides)))


def partition_everything(directory: Path) -> str:
    """An override whose DeepSpeed config has zero3 partition every parameter: by default it keeps those
    under 1e5 elements whole (stage3_param_persistence_threshold), which is every parameter of a tiny model."""
    path = directory / "ds_partition_everything.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return f"train.deepspeed_config={path}"


def train(raw: dict[str, Any], task: str = "pretrain", callbacks: tuple[Callback, ...] = ()) -> RunResult:
    """What each rank runs."""
    return run(RunConfig.from_dict(raw), task, callbacks)


def final_weights(result: RunResult) -> dict[str, torch.Tensor]:
    """The consolidated weights of the run's last checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(result.checkpoint / "model" / "model.safetensors"))


def assert_weights_follow(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str = "",
                          rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """``got`` holds ``expected``'s tensors within ``rtol``/``atol``, but for the odd element Adam moved apart:
    one whose gradient sits at the float32 noise floor gets an update of arbitrary sign (m / sqrt(v) of
    noise), so a run reducing in another order can land a fraction of one step (lr 3e-3 here) away. At most
    0.1% of a tensor's elements (and at least one) may do so, each within 1e-3; a wrong gradient moves many
    elements, or one by a whole step."""
    assert got.keys() == expected.keys(), f"{where} names differ: {sorted(got.keys() ^ expected.keys())}"
    for name, want in expected.items():
        have = got[name].to(want.dtype)
        far = ~torch.isclose(have, want, rtol=rtol, atol=atol)
        allowed = max(1, want.numel() // 1000)
        worst = float((have - want).abs().max()) if want.numel() else 0.0
        assert int(far.sum()) <= allowed and worst <= 1e-3, (
            f"{where}{name}: {int(far.sum())} of {want.numel()} elements beyond rtol {rtol} / atol {atol} "
            f"(at most {allowed} allowed), largest difference {worst:.3g} (at most 1e-3)")


class KillAt(Callback):
    """SIGKILL this process after ``step`` (a real crash: no cleanup, no checkpoint)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.step and trainer.env.rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


class StopAt(Callback):
    """End the run cleanly after ``step`` (it keeps the schedule of the full run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.step:
            trainer.stop(f"test stop at step {self.step}", reason="test")
