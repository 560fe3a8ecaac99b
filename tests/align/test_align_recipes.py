"""The shipped SFT and alignment recipes load, validate and pick the objective they mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from trainer.config import AlignLoss, RunConfig
from trainer.objectives import objective_name
from trainer.objectives.preference import check_align

CONFIGS = Path(__file__).parents[2] / "configs"
RECIPES = sorted((CONFIGS / "sft").glob("*.yaml")) + sorted((CONFIGS / "align").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.parent.name for p in RECIPES} == {"sft", "align"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads(path):
    cfg = load_config(RunConfig, path)
    task = path.parent.name
    assert cfg.model.init is not None and cfg.data.valid
    if task == "align":
        expected = "reward" if "reward" in path.name else cfg.align.loss.objective
        if expected == "preference":
            check_align(cfg.align)
        if cfg.align.loss is AlignLoss.ppo:  # its reward model is what the reward recipe beside it trains
            reward_recipe = load_config(RunConfig, path.with_name(path.name.replace("-ppo", "-reward")))
            assert [Path(r) for r in cfg.align.reward] == [reward_recipe.checkpoint_dir]
        elif cfg.align.loss.online:
            from trainer.rewards import build_rewards

            build_rewards(cfg.align.reward, cfg.align.reward_weights)  # the rewards resolve
        assert objective_name(cfg, task) == expected
    else:
        assert objective_name(cfg, task) == "sft"
