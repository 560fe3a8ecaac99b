"""Encoder MLM and T5 span corruption train under fsdp and zero3 on 2 ranks: the loss falls."""

import pytest
from spawn import spawn

from runs import tiny_config, train


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_loss_falls(corpus, tmp_path, arch, strategy):
    raw = tiny_config(corpus, tmp_path, f"train.strategy={strategy}", "train.max_steps=12", "train.lr=1e-2",
                      "checkpoint.save_final=false", "train.eval_every=12", "train.eval_steps=2", arch=arch)
    rank0, _ = spawn(train, 2, raw)
    assert rank0.eval_loss is not None and rank0.eval_loss < rank0.losses[0]
    first, last = sum(rank0.losses[:3]) / 3, sum(rank0.losses[-3:]) / 3
    assert last < 0.97 * first, rank0.losses
