"""Weights holding nan or inf are never saved as a checkpoint, never exported, never decoded; a first
step that blows the weights up stops the run at once. One line each, exit status 2 from the CLI."""

import shutil

import pytest
import torch
from reliability_runs import run_overrides

from common.errors import UserError
from launch.cli import main
from launch.entry import load
from model.io import load_pretrained, save_hf, save_pretrained
from trainer.callbacks import Callback
from trainer.run import run


class PoisonAt(Callback):
    """After ``step`` (and its checkpoint), set one weight to nan: what a diverged update leaves."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.step:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("nan")


def test_nan_weights_are_not_checkpointed_and_the_last_good_one_stays(shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load(None, run_overrides(shards, run_dir, "train.max_steps=4", "checkpoint.every=1"))
    with pytest.raises(UserError) as info:
        run(cfg, "pretrain", callbacks=(PoisonAt(2),))
    message = str(info.value)
    assert message.startswith("step 3: 1 of ") and "hold nan or inf (first: embed.tokens.weight)" in message
    assert "no checkpoint was written (the last one is step_000002)" in message and "\n" not in message
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000001", "step_000002"]
    assert (checkpoints / "latest").read_text().strip() == "step_000002"
    assert torch.isfinite(load_pretrained(checkpoints).embed.tokens.weight).all()


def test_a_first_step_that_blows_the_weights_up_stops_the_run(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["pretrain", *run_overrides(shards, run_dir, "train.lr=1e6", "train.warmup_steps=100",
                                            "checkpoint.every=1")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1
    assert lines[0].startswith("tessera pretrain: error: step 1 blew the weights up: their norm went from ")
    assert "(train.lr=1e+06); lower train.lr" in lines[0]
    assert not (run_dir / "checkpoints").exists()


def test_a_sane_lr_passes_the_blow_up_check(shards, tmp_path):
    cfg = load(None, run_overrides(shards, tmp_path / "run", "train.lr=1.0", "train.warmup_steps=1",
                                   "checkpoint.save_final=false"))
    assert run(cfg, "pretrain").steps == 2


@pytest.fixture
def nan_model_dir(trained_run, tmp_path):
    """A model directory (with its tokenizer) whose embedding holds a nan: no manifest to catch it."""
    model = load_pretrained(trained_run / "checkpoints")
    with torch.no_grad():
        model.embed.tokens.weight[3, 1] = float("nan")
    directory = save_pretrained(model, tmp_path / "nan-model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(trained_run / "checkpoints" / "step_000002" / "model" / name, directory / name)
    return directory


@pytest.mark.parametrize("command", ["export", "generate"])
def test_export_and_generate_refuse_non_finite_weights(command, nan_model_dir, tmp_path, capsys):
    args = ["--out", str(tmp_path / "hf")] if command == "export" else ["--prompt", "Once"]
    assert main([command, "--checkpoint", str(nan_model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tessera {command}: error: {nan_model_dir}: 1 of ") and err.count("\n") == 1
    assert "hold nan or inf (first: embed.tokens.weight); the model diverged" in err
    assert not (tmp_path / "hf").exists()


def test_save_hf_refuses_non_finite_tensors(trained_run, tmp_path):
    model = load_pretrained(trained_run / "checkpoints")
    with torch.no_grad():
        model.stack.layers[0].mlp.down.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"export to .*hold nan or inf"):
        save_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
