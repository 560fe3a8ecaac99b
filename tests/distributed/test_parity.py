"""Every strategy on 2 ranks gives the single-process loss curve for the same global batch (fp32)."""

import numpy as np
import pytest
from runs import partition_everything, tiny_config, train
from spawn import spawn

STEPS = 10


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> list[float]:
    """One process, micro-batch 4 × 2 accumulation steps = global batch 8."""
    raw = tiny_config(corpus, tmp_path_factory.mktemp("single"), "train.global_batch_size=8",
                      f"train.max_steps={STEPS}", "checkpoint.save_final=false")
    [result] = spawn(train, 1, raw)
    assert len(result.losses) == STEPS and result.losses[-1] < result.losses[0]
    return result.losses


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_two_ranks_match_single_process(corpus, tmp_path, reference, strategy):
    raw = tiny_config(corpus, tmp_path, f"train.strategy={strategy}", "train.global_batch_size=8",
                      f"train.max_steps={STEPS}", "checkpoint.save_final=false")
    rank0, rank1 = spawn(train, 2, raw)
    assert rank0.losses == rank1.losses  # every rank reports the global loss
    np.testing.assert_allclose(rank0.losses, reference, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["model.tie_embeddings=true", "model.tie_embeddings=false",
                                     "train.loss_chunk_size=0"])
def test_zero3_with_every_parameter_partitioned_matches_single_process(corpus, tmp_path, setting):
    """The tiny model's parameters are all below DeepSpeed's persistence threshold (1e5 elements), so the
    run above never partitions one; here every parameter is, the LM head (tied to the embeddings or
    not) included, and the chunked linear+CE must find it gathered inside the model's forward. The
    strong weight decay shows whether matrices (only) still get it once their data is partitioned."""
    common = (setting, "train.weight_decay=3.0", "train.global_batch_size=8", f"train.max_steps={STEPS}",
              "checkpoint.save_final=false")
    [single] = spawn(train, 1, tiny_config(corpus, tmp_path / "single", *common))
    raw = tiny_config(corpus, tmp_path, "train.strategy=zero3", partition_everything(tmp_path), *common)
    rank0, rank1 = spawn(train, 2, raw)
    assert rank0.losses == rank1.losses
    np.testing.assert_allclose(rank0.losses, single.losses, rtol=1e-4)


@pytest.mark.slow
def test_four_micro_steps_on_one_rank_equal_one_on_four_ranks(corpus, tmp_path):
    common = ("train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=6",
              "checkpoint.save_final=false")
    [accumulated] = spawn(train, 1, tiny_config(corpus, tmp_path / "one", *common))
    four = spawn(train, 4, tiny_config(corpus, tmp_path / "four", "train.strategy=ddp", *common))
    np.testing.assert_allclose(four[0].losses, accumulated.losses, rtol=1e-5)
