"""Kill a rank mid-run, start again: the run resumes from the latest checkpoint and ends bitwise equal."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from runs import KillAt, StopAt, final_weights, tiny_config, train
from spawn import RanksFailed, spawn


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_sigkill_then_restart_equals_uninterrupted(corpus, tmp_path, strategy):
    common = (f"train.strategy={strategy}", "train.global_batch_size=8", "train.max_steps=8", "checkpoint.every=3")
    straight = spawn(train, 2, tiny_config(corpus, tmp_path / "straight", *common))[0]

    crashed = tiny_config(corpus, tmp_path / "crashed", *common)
    with pytest.raises(RanksFailed) as info:
        spawn(train, 2, crashed, "pretrain", (KillAt(step=7, rank=1),))
    assert f"rank 1 died with exit code {-signal.SIGKILL}" in str(info.value)
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text().strip() == "step_000006"

    resumed = spawn(train, 2, crashed)[0]
    assert resumed.steps == 8 and len(resumed.losses) == 2  # steps 7 and 8 only
    assert resumed.losses == straight.losses[-2:]
    expected, got = final_weights(straight), final_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one(corpus, tmp_path):
    common = ("train.strategy=fsdp", "train.global_batch_size=8", "checkpoint.every=3", "train.max_steps=9")
    straight = spawn(train, 2, tiny_config(corpus, tmp_path / "straight", *common))[0]
    first = spawn(train, 2, tiny_config(corpus, tmp_path / "split", *common), "pretrain", (StopAt(6),))[0]
    assert first.steps == 6
    [second] = spawn(train, 1, tiny_config(corpus, tmp_path / "split", *common))
    assert second.steps == 9 and len(second.losses) == 3
    np.testing.assert_allclose(second.losses, straight.losses[-3:], rtol=1e-4)
