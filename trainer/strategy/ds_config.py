"""The DeepSpeed config: generated from ours, or the user's JSON checked against ours.

Configs are accepted as users carry them from the HF Trainer and DeepSpeedExamples: "auto" values
are filled from the run, as the HF Trainer does, and a concrete value must agree with the run
(DeepSpeed asserts train_batch_size = micro × accumulation × ranks; lr, betas, warmup, clipping,
precision and the ZeRO stage follow train.*). The optimizer and scheduler blocks must describe
AdamW and train.schedule; Tessera's own AdamW and schedule then run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import read_json_object
from common.errors import ConfigError
from trainer.config import Schedule, TrainConfig


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
    return merge_user_config(read_user_config(cfg.deepspeed_config), ours, cfg)


def read_user_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, "train.deepspeed_config")


# DeepSpeed's scheduler types and the train.schedule each one is
SCHEDULERS = {"WarmupLR": Schedule.constant, "WarmupDecayLR": Schedule.linear, "WarmupCosineLR": Schedule.cosine}
OPTIMIZERS = ("adam", "adamw")  # DeepSpeed's Adam is AdamW unless adam_w_mode is false


def merge_user_config(user: dict[str, Any], ours: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The user's config as the HF Trainer reads it: "auto" filled from the run, a concrete value that
    disagrees with the run is one line naming both; the optimizer and scheduler blocks describe ours
    (our AdamW and schedule run, DeepSpeed's would compile C++ ops), so they are checked and dropped."""
    merged = dict(user)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        _agree(key, user.get(key, "auto"), ours[key], "train.micro_batch_size/global_batch_size")
        merged[key] = ours[key]
    zero = dict(user.get("zero_optimization", {}))
    stage = ours["zero_optimization"]["stage"]
    _agree("zero_optimization.stage", zero.get("stage", stage), stage, "train.strategy", f"zero{stage}")
    zero = {k: v for k, v in zero.items() if v != "auto"}  # stage3_*/bucket sizes: DeepSpeed's defaults
    merged["zero_optimization"] = {**ours["zero_optimization"], **zero, "stage": stage}
    _agree("gradient_clipping", user.get("gradient_clipping", "auto"), cfg.grad_clip, "train.grad_clip")
    merged["gradient_clipping"] = ours["gradient_clipping"]
    if "optimizer" in merged:
        _check_optimizer(merged.pop("optimizer"), cfg)
    if "scheduler" in merged:
        _check_scheduler(merged.pop("scheduler"), cfg)
    for key in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print"):
        merged.setdefault(key, ours[key])
    bf16 = merged.get("bf16", ours["bf16"])
    _agree("bf16.enabled", bf16.get("enabled", "auto"), ours["bf16"]["enabled"], "train.precision", cfg.precision)
    merged["bf16"] = {**bf16, "enabled": ours["bf16"]["enabled"]}
    if merged.get("fp16", {}).get("enabled", False) not in (False, "auto"):
        raise ConfigError("train.deepspeed_config: fp16 is not supported; set \"fp16\": {\"enabled\": false} "
                          "and use train.precision=bf16")
    merged.pop("fp16", None)
    return merged


def _agree(key: str, value: Any, run_value: Any, run_key: str, run_shown: Any = None) -> None:
    """A concrete ``value`` in the user's config must equal the run's (``"auto"`` always does)."""
    if value == "auto":
        return
    same = abs(value - run_value) <= 1e-12 * max(1.0, abs(run_value)) if _is_number(value) and _is_number(run_value) \
        else value == run_value
    if not same:
        shown = run_value if run_shown is None else run_shown
        raise ConfigError(f"train.deepspeed_config: {key}={value} disagrees with {run_key}={shown}; "
                          f"set it to \"auto\" or change {run_key}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_optimizer(block: dict[str, Any], cfg: TrainConfig) -> None:
    kind = str(block.get("type", "")).lower()
    params = block.get("params", {})
    if kind not in OPTIMIZERS or params.get("adam_w_mode", True) is False:
        raise ConfigError(f"train.deepspeed_config: optimizer {block.get('type')!r} is not supported; Tessera "
                          "trains with AdamW (type Adam or AdamW, its params \"auto\" or equal to train.*)")
    _agree("optimizer.params.lr", params.get("lr", "auto"), cfg.lr, "train.lr")
    _agree("optimizer.params.weight_decay", params.get("weight_decay", "auto"), cfg.weight_decay, "train.weight_decay")
    _agree("optimizer.params.eps", params.get("eps", "auto"), cfg.eps, "train.eps")
    betas = params.get("betas", "auto")
    _agree("optimizer.params.betas", betas if betas == "auto" else list(betas), list(cfg.betas), "train.betas")


def _check_scheduler(block: dict[str, Any], cfg: TrainConfig) -> None:
    kind = block.get("type")
    if kind not in SCHEDULERS:
        raise ConfigError(f"train.deepspeed_config: scheduler {kind!r} is not supported; use one of "
                          f"{', '.join(SCHEDULERS)} or drop the block (train.schedule sets it)")
    if SCHEDULERS[kind] != cfg.schedule:
        raise ConfigError(f"train.deepspeed_config: scheduler {kind} is train.schedule={SCHEDULERS[kind]}, but the "
                          f"run has train.schedule={cfg.schedule}; change one of them")
    params = block.get("params", {})
    _agree("scheduler.params.warmup_max_lr", params.get("warmup_max_lr", "auto"), cfg.lr, "train.lr")
    _agree("scheduler.params.warmup_num_steps", params.get("warmup_num_steps", "auto"), cfg.warmup_steps,
           "train.warmup_steps")
    _agree("scheduler.params.total_num_steps", params.get("total_num_steps", "auto"), cfg.max_steps,
           "train.max_steps")
    _agree("scheduler.params.warmup_min_lr", params.get("warmup_min_lr", "auto"), 0.0, "the warmup's start (0)")
    if kind == "WarmupCosineLR":
        _agree("scheduler.params.cos_min_ratio", params.get("cos_min_ratio", "auto"), cfg.min_lr / cfg.lr,
               "train.min_lr/train.lr")
