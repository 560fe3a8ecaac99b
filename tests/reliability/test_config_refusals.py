"""Bad values are refused when the config loads: one line naming the key, exit status 2, nothing run."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from launch.cli import main
from launch.entry import load

REPO = Path(__file__).resolve().parents[2]

CASES = [
    ("train.lr=nan", "train.lr: must be a finite number"),
    ("train.lr=inf", "train.lr: must be a finite number"),
    ("train.lr=.inf", "train.lr: must be a finite number"),
    ("train.min_lr=nan", "train.min_lr: must be a finite number"),
    ("train.weight_decay=-inf", "train.weight_decay: must be a finite number"),
    ("train.eps=nan", "train.eps: must be a finite number"),
    ("train.grad_clip=inf", "train.grad_clip: must be a finite number"),
    ("train.betas=[0.9, nan]", "train.betas[1]: must be a finite number"),
    ("model.rope_theta=inf", "model.rope_theta: must be a finite number"),
    ("data.mlm_probability=nan", "data.mlm_probability: must be a finite number"),
    ("align.beta=.nan", "align.beta: must be a finite number"),
    ("train.global_batch_size=0", "train.global_batch_size: must be at least 1"),
    ("train.global_batch_size=-8", "train.global_batch_size: must be at least 1"),
    ("log.every=0", "log.every: must be at least 1"),
    ("train.eval_every=-1", "train.eval_every: must not be negative"),
    ("log.dir={file}", "log.dir: {file} exists and is not a directory"),
    ("checkpoint.dir={file}", "checkpoint.dir: {file} exists and is not a directory"),
]


@pytest.mark.parametrize(("override", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_value_is_refused_at_load_in_one_line(override, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, not even runs/default
    file = tmp_path / "a_file"
    file.write_text("not a directory\n")
    override, message = override.format(file=file), message.format(file=file)
    assert main(["pretrain", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tessera pretrain: error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_non_finite_value_in_a_yaml_recipe_exits_2_from_the_real_command(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("train:\n  lr: .nan\nlog:\n  dir: runs/x\n")
    done = subprocess.run([sys.executable, "-m", "launch.cli", "pretrain", "--config", str(recipe)],
                          cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "tessera pretrain: error: train.lr: must be a finite number, got nan\n"
    assert not (tmp_path / "runs").exists()


def test_finite_values_still_load():
    cfg = load(None, ["train.lr=1e-3", "train.global_batch_size=16", "log.every=5", "train.eval_every=0"])
    assert (cfg.train.lr, cfg.train.global_batch_size, cfg.log.every) == (1e-3, 16, 5)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_what_the_command_cannot_train_exits_2_before_anything_is_written(nproc, tmp_path, capsys, monkeypatch):
    """Preference alignment under pp is judged with the command's objective (trainer/config.py check_task):
    refused once, by the parent of --nproc ranks too, before any rank, rendezvous or shard."""
    monkeypatch.chdir(tmp_path)
    assert main(["align", "--nproc", nproc, "train.strategy=ddp", "parallel.pp=2",
                 "train.global_batch_size=16"]) == 2
    err = capsys.readouterr().err
    assert err == ("tessera align: error: parallel.pp=2 trains train.objective=clm or sft, not preference (the "
                   "objective of align.loss=dpo); set parallel.pp=1 to train it\n")
    assert list(tmp_path.iterdir()) == []


def test_what_parallel_cannot_split_in_the_model_init_names_is_refused_before_its_weights(shards, tmp_path):
    """With model.init the model section is not the model: its saved config is judged as it is read (meta
    device), before the strategy loads its weights or asks for ranks; one line, nothing run."""
    from reliability_runs import run_overrides

    from model import ModelConfig, build_model
    from model.io import save_pretrained
    from trainer.run import run

    init = save_pretrained(build_model(ModelConfig.from_dict({"preset": "tiny-moe", "vocab_size": 320})),
                           tmp_path / "moe")
    cfg = load(None, run_overrides(shards, tmp_path / "run", f"model.init={init}", "train.strategy=ddp",
                                   "parallel.tp=2"), "pretrain")
    with pytest.raises(UserError, match=r"^parallel\.tp splits attention heads and dense MLPs: not for MoE models "
                                        r"or per-head score biases \(model\.pos=rope\)$"):
        run(cfg, "pretrain")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]
