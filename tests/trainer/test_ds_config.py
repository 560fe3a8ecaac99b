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
        ({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}, "optimizer 'Lamb' is not supported"),
        ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "optimizer 'Adam' is not supported"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "params.lr=0.001 disagrees with train.lr"),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, r"betas=\[0.9, 0.999\] disagrees"),
        ({"scheduler": {"type": "WarmupLR"}}, "WarmupLR is train.schedule=constant, but the run has .*cosine"),
        ({"scheduler": {"type": "OneCycle"}}, "scheduler 'OneCycle' is not supported"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}}},
         "warmup_num_steps=10 disagrees with train.warmup_steps=100"),
        ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 disagrees with train.grad_clip=1.0"),
        ({"bf16": {"enabled": True}}, "bf16.enabled=True disagrees with train.precision=fp32"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
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


# The shapes of the configs users carry: the HF Trainer's DeepSpeed docs (ds_config_zero2.json,
# ds_config_zero3.json) and DeepSpeedExamples' training scripts, written out here.
HF_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}
DS_EXAMPLES_ZERO2 = {
    "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10,
    "optimizer": {"type": "Adam", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_min_lr": 0, "warmup_num_steps": 100,
                                                       "total_num_steps": 1000, "cos_min_ratio": 0.1}},
    "gradient_clipping": 1.0, "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "reduce_scatter": True, "overlap_comm": True,
                          "allgather_bucket_size": 5e8, "reduce_bucket_size": 5e8},
}


def test_the_hf_trainers_zero3_config_runs_as_written(tmp_path):
    cfg = train(tmp_path, HF_ZERO3, strategy="zero3", schedule="linear", precision="bf16")
    ds = build_ds_config(cfg, stage=3, accumulation=2, world_size=2)
    assert "optimizer" not in ds and "scheduler" not in ds and "fp16" not in ds  # ours run instead
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (16, 4, 2)
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["stage3_max_live_parameters"] == 1e9
    assert "auto" not in json.dumps(ds)  # what DeepSpeed gets has no "auto" left: its defaults fill the rest


def test_a_deepspeed_examples_config_with_concrete_values_agrees_with_its_run(tmp_path):
    cfg = train(tmp_path, DS_EXAMPLES_ZERO2, precision="bf16", min_lr=3e-5)
    ds = build_ds_config(cfg, stage=2, accumulation=2, world_size=2)
    assert ds["zero_optimization"]["allgather_bucket_size"] == 5e8 and "optimizer" not in ds
    with pytest.raises(ConfigError, match=r"cos_min_ratio=0.1 disagrees with train.min_lr/train.lr=0.2"):
        build_ds_config(train(tmp_path, DS_EXAMPLES_ZERO2, precision="bf16", min_lr=6e-5), stage=2,
                        accumulation=2, world_size=2)
