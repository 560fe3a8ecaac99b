import json

import pytest

from common.errors import ConfigError
from trainer.config import TrainConfig
from trainer.strategy.ds_config import build_ds_config


def train(tmp_path, user: dict | None = None, **kw) -> TrainConfig:
    raw = {"strategy": "zero2", "micro_batch_size": 4, "global_batch_size": 16, **kw}
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        raw["deepspeed_config"] = str(path)
    return TrainConfig.from_dict(raw, "train")


def test_generated_config_matches_batch_sizes(tmp_path):
    ds = build_ds_config(train(tmp_path, offload="optimizer"), stage=2, accumulation=2, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_user_config_auto_values_are_filled(tmp_path):
    user = {"train_batch_size": "auto", "zero_optimization": {"stage": 2, "overlap_comm": True}}
    ds = build_ds_config(train(tmp_path, user), stage=2, accumulation=2, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"train_batch_size": 32}, "train_batch_size=32 disagrees"),
        ({"zero_optimization": {"stage": 3}}, "stage=3 disagrees with train.strategy=zero2"),
        ({"optimizer": {"type": "AdamW"}}, "remove the \"optimizer\" block"),
    ],
)
def test_user_config_inconsistent_with_ours_is_one_line(tmp_path, user, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_ds_config(train(tmp_path, user), stage=2, accumulation=2, world_size=2)
    assert "\n" not in str(info.value)


def test_missing_user_config(tmp_path):
    cfg = TrainConfig.from_dict({"strategy": "zero1", "deepspeed_config": str(tmp_path / "no.json")}, "train")
    with pytest.raises(ConfigError, match="file not found"):
        build_ds_config(cfg, stage=1, accumulation=1, world_size=1)
