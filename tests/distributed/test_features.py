"""bf16, activation checkpointing, CPU offload and HSDP: each trains and agrees with its reference."""

import json

import numpy as np
import pytest
import torch
from runs import final_weights, tiny_config, train
from spawn import spawn

from trainer.callbacks import Callback

STEPS = ("train.max_steps=4", "checkpoint.save_final=false", "train.global_batch_size=8")


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> list[float]:
    [result] = spawn(train, 1, tiny_config(corpus, tmp_path_factory.mktemp("single"), *STEPS))
    return result.losses


@pytest.mark.parametrize(("mode", "strategy", "ranks"), [("true", "single", 1), ("selective", "fsdp", 2),
                                                        ("selective", "zero3", 2)])
def test_activation_checkpointing_changes_nothing(corpus, tmp_path, single, mode, strategy, ranks):
    raw = tiny_config(corpus, tmp_path, *STEPS, f"train.activation_checkpointing={mode}", f"train.strategy={strategy}")
    result, *_ = spawn(train, ranks, raw)
    np.testing.assert_allclose(result.losses, single, rtol=1e-6)


@pytest.mark.slow
def test_hsdp_two_nodes_of_one_rank(corpus, tmp_path, single):
    raw = tiny_config(corpus, tmp_path, *STEPS, "train.strategy=fsdp", "train.hsdp=true")
    rank0, _ = spawn(train, 2, raw, env={"LOCAL_WORLD_SIZE": "1"})
    np.testing.assert_allclose(rank0.losses, single, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])  # FSDP2 offload needs an accelerator
def test_cpu_offload(corpus, tmp_path, single, strategy):
    offload = "optimizer+params" if strategy == "zero3" else "optimizer"
    raw = tiny_config(corpus, tmp_path, *STEPS, f"train.strategy={strategy}", f"train.offload={offload}")
    rank0, _ = spawn(train, 2, raw)
    np.testing.assert_allclose(rank0.losses, single, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "fsdp", "zero2"])
def test_bf16_follows_fp32(corpus, tmp_path, single, strategy):
    raw = tiny_config(corpus, tmp_path, *STEPS, f"train.strategy={strategy}", "train.precision=bf16")
    losses = spawn(train, 1 if strategy == "single" else 2, raw)[0].losses
    np.testing.assert_allclose(losses, single, rtol=2e-2)


@pytest.mark.slow
def test_compiled_blocks_match_eager(corpus, tmp_path, single):
    [result] = spawn(train, 1, tiny_config(corpus, tmp_path, *STEPS, "train.compile=true"))
    np.testing.assert_allclose(result.losses, single, rtol=1e-5)


class MasterWeights(Callback):
    """The optimizer's fp32 master weights at the end of the run (every rank gathers)."""

    def on_train_end(self, trainer) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        params = trainer.strategy.model.module.named_parameters()
        self.weights = {name: safe_get_full_fp32_param(p).cpu().numpy() for name, p in params}  # picklable


def train_reading_masters(raw):
    masters = MasterWeights()
    return train(raw, callbacks=(masters,)), masters.weights


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_bf16_saves_the_fp32_master_weights(corpus, tmp_path, strategy):
    """The model directory (model.init, export, generate) gets the fp32 masters, as under fsdp, not the
    bf16 copy the module trains with."""
    raw = tiny_config(corpus, tmp_path, "train.max_steps=3", "train.precision=bf16", f"train.strategy={strategy}")
    (result, masters), _ = spawn(train_reading_masters, 2, raw)
    saved = final_weights(result)
    assert saved.keys() == masters.keys()
    assert all(np.array_equal(saved[k].numpy(), masters[k]) for k in masters)
    as_bf16 = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in masters.items()}
    assert any(not np.array_equal(v, as_bf16[k]) for k, v in masters.items())  # not bf16 values


@pytest.mark.slow
def test_the_hf_trainers_zero3_config_as_written_trains_like_single(corpus, tmp_path, single):
    """A ds_config the way HF Trainer users carry it ("auto" everywhere, optimizer and scheduler blocks)."""
    user = {
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW",
                      "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_min_lr": "auto", "warmup_num_steps": "auto",
                                                           "total_num_steps": "auto", "cos_min_ratio": "auto"}},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto",
                              "stage3_gather_16bit_weights_on_model_save": True},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2000, "wall_clock_breakdown": False,
    }
    path = tmp_path / "ds_config_zero3.json"
    path.write_text(json.dumps(user))
    raw = tiny_config(corpus, tmp_path, *STEPS, "train.strategy=zero3", f"train.deepspeed_config={path}")
    rank0, _ = spawn(train, 2, raw)
    np.testing.assert_allclose(rank0.losses, single, rtol=1e-4)
