"""bf16, activation checkpointing, CPU offload and HSDP: each trains and agrees with its reference."""

import numpy as np
import pytest
from spawn import spawn

from runs import tiny_config, train

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
