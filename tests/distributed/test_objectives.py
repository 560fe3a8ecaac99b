"""Encoder MLM and T5 span corruption on 2 ranks under fsdp and zero3 (every parameter partitioned)
give the single-process losses."""

import numpy as np
import pytest
from runs import partition_everything, tiny_config, train
from spawn import spawn

STEPS = 6


SETTINGS = (f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.lr=1e-2", "checkpoint.save_final=false",
            f"train.eval_every={STEPS}", "train.eval_steps=1000")  # the whole validation set


@pytest.fixture(scope="module", params=["encoder", "encoder_decoder"])
def single(request, corpus, tmp_path_factory):
    arch = request.param
    raw = tiny_config(corpus, tmp_path_factory.mktemp(arch), *SETTINGS, arch=arch)
    [result] = spawn(train, 1, raw)
    assert result.losses[-1] < result.losses[0]
    return arch, result


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_two_ranks_match_single_process(corpus, tmp_path, single, strategy):
    arch, reference = single
    extra = (partition_everything(tmp_path),) if strategy == "zero3" else ()
    raw = tiny_config(corpus, tmp_path, f"train.strategy={strategy}", *extra, *SETTINGS, arch=arch)
    rank0, rank1 = spawn(train, 2, raw)
    assert rank0.losses == rank1.losses
    np.testing.assert_allclose(rank0.losses, reference.losses, rtol=1e-4)
    # evaluation reads each rank's share of the validation set: not the single process's batches (1e-4 apart here)
    np.testing.assert_allclose(rank0.eval_loss, reference.eval_loss, rtol=1e-3)
