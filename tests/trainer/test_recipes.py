"""Every shipped recipe loads and validates, and every ds_config merges with its strategy."""

import json
from pathlib import Path

import pytest

from common.config import load_config
from trainer.config import RunConfig
from trainer.strategy.ds_config import build_ds_config

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_pretrain_recipe_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_config_merges(path):
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    cfg = load_config(RunConfig, None, [f"train.strategy=zero{stage}", f"train.deepspeed_config={path}",
                                        "train.micro_batch_size=4", "train.global_batch_size=32"]).train
    ds = build_ds_config(cfg, stage=stage, accumulation=2, world_size=4)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == stage
