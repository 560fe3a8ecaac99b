"""The DeepSpeed config: generated from ours, or the user's JSON checked against ours.

Batch sizes must agree (DeepSpeed asserts train_batch_size = micro × accumulation × ranks);
"auto" values are filled in, like the HF Trainer does. The ZeRO stage follows train.strategy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import read_json_object
from common.errors import ConfigError
from trainer.config import TrainConfig


def generated(cfg: TrainConfig, stage: int, accumulation: int, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if cfg.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW is the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ...also with offload (no C++ build of DeepSpeedCPUAdam)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_ds_config(cfg: TrainConfig, stage: int, accumulation: int, world_size: int) -> dict[str, Any]:
    """Ours, or the user's with its batch sizes and stage checked and "auto" filled from ours."""
    ours = generated(cfg, stage, accumulation, world_size)
    if cfg.deepspeed_config is None:
        return ours
    return merge_user_config(read_user_config(cfg.deepspeed_config), ours)


def read_user_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, "train.deepspeed_config")


def merge_user_config(user: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    merged = dict(user)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        value = user.get(key, "auto")
        if value != "auto" and value != ours[key]:
            raise ConfigError(
                f"train.deepspeed_config: {key}={value} disagrees with the run's batch sizes ({ours[key]}); "
                "set it to \"auto\" or change train.micro_batch_size/global_batch_size"
            )
        merged[key] = ours[key]
    zero = dict(user.get("zero_optimization", {}))
    stage = ours["zero_optimization"]["stage"]
    if zero.get("stage", stage) != stage:
        raise ConfigError(
            f"train.deepspeed_config: zero_optimization.stage={zero['stage']} disagrees with train.strategy=zero{stage}"
        )
    merged["zero_optimization"] = {**ours["zero_optimization"], **zero, "stage": stage}
    if merged.get("gradient_clipping", "auto") == "auto":
        merged["gradient_clipping"] = ours["gradient_clipping"]
    if "optimizer" in merged:
        raise ConfigError(
            "train.deepspeed_config: remove the \"optimizer\" block; the optimizer comes from train.lr/betas/"
            "weight_decay (DeepSpeed's own would compile C++ ops)"
        )
    for key in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print"):
        merged.setdefault(key, ours[key])
    if merged.setdefault("bf16", ours["bf16"]).get("enabled") == "auto":
        merged["bf16"] = ours["bf16"]
    return merged
