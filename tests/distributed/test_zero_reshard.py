"""ZeRO checkpoints resume on another number of ranks (DeepSpeed universal checkpoints), 2 → 1 → 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from runs import StopAt, final_weights, tiny_config, train
from spawn import spawn

from common.errors import UserError
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.strategy.deepspeed import TAG, DeepSpeed

# fp32: the measured gap is <= 1e-7 (float32 rounding: two ranks all-reduce their gradients where one
# rank accumulates two micro-batches, a different summation order), so 1e-6 leaves room for that and no more.
RTOL = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["train.strategy=zero1", "train.strategy=zero2", "train.strategy=zero3",
                                     "train.strategy=zero3 train.offload=optimizer+params"])
def test_zero_checkpoint_resumes_on_one_rank_then_on_two(corpus, tmp_path, setting):
    common = (*setting.split(), "train.global_batch_size=8", "checkpoint.every=3", "checkpoint.keep_last=3",
              "train.max_steps=9")
    straight = spawn(train, 2, tiny_config(corpus, tmp_path / "straight", *common))[0]

    split = tiny_config(corpus, tmp_path / "split", *common)
    first = spawn(train, 2, split, "pretrain", (StopAt(3),))[0]
    [second] = spawn(train, 1, split, "pretrain", (StopAt(6),))
    third = spawn(train, 2, split)[0]
    assert (first.steps, second.steps, third.steps) == (3, 6, 9)
    checkpoints = tmp_path / "split" / "checkpoints"
    for step in (3, 6):  # each resume at another world size converted the step it started from
        assert (checkpoints / f"step_{step:06d}" / "deepspeed_universal" / "deepspeed" / "zero").is_dir()

    resumed = first.losses + second.losses + third.losses
    np.testing.assert_allclose(resumed, straight.losses, rtol=RTOL)
    expected, got = final_weights(straight), final_weights(third)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=1e-6, msg=name)

    step3 = checkpoints / "step_000003"
    checkpoint.verify(step3)  # the converted directory, added after the save, leaves the manifest check whole
    converted = (step3 / "deepspeed_universal").stat().st_mtime_ns
    again = tiny_config(corpus, tmp_path / "split", *common, f"checkpoint.resume={step3}",
                        "checkpoint.save_final=false")
    [repeat] = spawn(train, 1, again, "pretrain", (StopAt(4),))
    assert repeat.losses == second.losses[:1]  # the conversion is reused, not redone
    assert (step3 / "deepspeed_universal").stat().st_mtime_ns == converted


@pytest.mark.parametrize("where", ["resuming run", "saved checkpoint"])
def test_nvme_offloaded_optimizer_state_does_not_reshard(tmp_path, where):
    # NVMe offload needs DeepSpeed's async_io op (libaio), absent on CPU machines: the check runs before any engine
    step = tmp_path / "step_000003"
    (step / TAG).mkdir(parents=True)
    state = {"step": 3, "tokens_seen": 96, "world_size": 2, "strategy": "zero3", "format": "deepspeed-zero3",
             "guard": {}}
    (step / "trainer_state.json").write_text(json.dumps(state))
    raw = {"strategy": "zero3", "micro_batch_size": 4, "global_batch_size": 8}
    if where == "resuming run":
        (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}))
        raw["deepspeed_config"] = str(tmp_path / "ds.json")
    else:
        (step / TAG / "offloaded_tensors" / "rank00").mkdir(parents=True)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    with pytest.raises(UserError) as info:
        DeepSpeed(TrainConfig.from_dict(raw, "train"), env, accumulation=2).load(step)
    message = str(info.value)
    assert "\n" not in message
    assert "saved on 2 ranks; zero3 with the optimizer state offloaded to NVMe cannot resume it on 1" in message
    assert not (step / "deepspeed_universal").exists()
