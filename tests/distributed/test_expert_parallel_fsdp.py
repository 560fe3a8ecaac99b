"""Expert parallel composed with FSDP2 (train.strategy=fsdp + parallel.ep): experts sharded over the dp
ranks of the (dp, ep) mesh, everything else over every rank; follows ddp and one process, and its
checkpoints resume under plain fsdp and ddp, and the other way round."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from spawn import spawn
from test_moe_runs import moe_config, train

from runs import assert_weights_follow, final_weights


def _grad_norms(run_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "grad_norm" in line]


def _resume(source, run_dir, step: str) -> None:
    shutil.copytree(source / "checkpoints" / step, run_dir / "checkpoints" / step)
    (run_dir / "checkpoints" / "latest").write_text(step)


def test_expert_parallel_with_fsdp_on_two_ranks_follows_ddp(corpus, tmp_path):
    """ep=2, dp=1, with accumulation and activation checkpointing: the fast check."""
    common = ("train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=2")
    ddp, _ = spawn(train, 2, moe_config(corpus, tmp_path / "ddp", *common, "train.strategy=ddp"))
    ep, _ = spawn(train, 2, moe_config(corpus, tmp_path / "ep", *common, "train.strategy=fsdp", "parallel.ep=2",
                                       "train.activation_checkpointing=full"))
    np.testing.assert_allclose(ep.losses, ddp.losses, rtol=1e-6)
    np.testing.assert_allclose(_grad_norms(tmp_path / "ep"), _grad_norms(tmp_path / "ddp"), rtol=1e-5)


@pytest.mark.slow
def test_expert_parallel_with_fsdp_follows_ddp_and_one_process_and_reshards_its_checkpoints(corpus, tmp_path):
    """ep=2 × dp=2 on 4 ranks: each rank holds one of its ep group's two experts' dp shards."""
    common = ("train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=10", "checkpoint.every=5")
    [single] = spawn(train, 1, moe_config(corpus, tmp_path / "single", *common))
    ddp = spawn(train, 4, moe_config(corpus, tmp_path / "ddp", *common, "train.strategy=ddp",
                                     "checkpoint.save_final=true"))
    ep = spawn(train, 4, moe_config(corpus, tmp_path / "ep", *common, "train.strategy=fsdp", "parallel.ep=2",
                                    "checkpoint.save_final=true"))
    assert all(r.losses == ep[0].losses for r in ep)
    np.testing.assert_allclose(ep[0].losses, ddp[0].losses, rtol=1e-5)
    np.testing.assert_allclose(ep[0].losses, single.losses, rtol=1e-4)
    np.testing.assert_allclose(_grad_norms(tmp_path / "ep"), _grad_norms(tmp_path / "ddp"), rtol=1e-5)
    assert ep[0].losses[-1] < ep[0].losses[0] - 0.2

    ep_weights, ddp_weights = final_weights(ep[0]), final_weights(ddp[0])  # whole experts, plain names
    assert ep_weights.keys() == ddp_weights.keys()
    assert_weights_follow(ep_weights, ddp_weights)

    # the ep × fsdp checkpoint of step 5 resumes under plain fsdp and under ddp, and goes on as uninterrupted
    for strategy in ("fsdp", "ddp"):
        resumed = tmp_path / f"resumed_{strategy}"
        _resume(tmp_path / "ep", resumed, "step_000005")
        again = spawn(train, 4, moe_config(corpus, resumed, *common, f"train.strategy={strategy}"))
        np.testing.assert_allclose(again[0].losses, ep[0].losses[5:], rtol=1e-5, err_msg=strategy)
    # and the ddp checkpoint of step 5 resumes under ep × fsdp (each rank takes its dp shard of its experts)
    resumed = tmp_path / "resumed_ep"
    _resume(tmp_path / "ddp", resumed, "step_000005")
    again = spawn(train, 4, moe_config(corpus, resumed, *common, "train.strategy=fsdp", "parallel.ep=2"))
    np.testing.assert_allclose(again[0].losses, ddp[0].losses[5:], rtol=1e-5)
