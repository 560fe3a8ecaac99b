"""Mixture-of-Experts runs through the real trainer: tiny-moe learns, router statistics reach
metrics.jsonl; DDP (with activation checkpointing), FSDP, ZeRO-3 and expert parallel follow the
single-process run; expert-parallel checkpoints resume under DDP and back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from spawn import spawn

from common.config import merge, parse_overrides
from runs import assert_weights_follow, final_weights, tiny_config, train

MOE = {"preset": "tiny-moe", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "moe_d_ff": 32, "max_seq_len": 64,
       "router_z_loss_coef": 0.001}


def moe_config(corpus, run_dir, *overrides):
    """tiny_config with the MoE model; model.* overrides apply on top of it."""
    model = [o for o in overrides if o.startswith("model.")]
    raw = tiny_config(corpus, run_dir, "checkpoint.save_final=false", *(o for o in overrides if o not in model))
    raw["model"] = merge(dict(MOE), parse_overrides(model)["model"]) if model else dict(MOE)
    return raw


def test_tiny_moe_pretrains_and_logs_router_statistics(corpus, tmp_path):
    [result] = spawn(train, 1, moe_config(corpus, tmp_path / "run", "train.max_steps=30"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    last = lines[-1]
    loads = [last[f"moe/load/{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0) and min(loads) > 0
    assert 1.0 <= last["moe/aux_loss"] < 2.0 and last["moe/z_loss"] > 0 and last["moe/dropped"] == 0  # dropless
    assert last["moe/router_loss"] == pytest.approx(2 * (0.01 * last["moe/aux_loss"] + 0.001 * last["moe/z_loss"]),
                                                    rel=1e-3)  # tiny-moe's coefficients, two layers


def test_ddp_fsdp_zero3_and_activation_checkpointing_follow_the_single_process_run(corpus, tmp_path):
    steps = ("train.max_steps=3", "train.global_batch_size=8")
    [single] = spawn(train, 1, moe_config(corpus, tmp_path / "single", *steps))
    ddp, _ = spawn(train, 2, moe_config(corpus, tmp_path / "ddp", *steps, "train.strategy=ddp"))
    recomputed, _ = spawn(train, 2, moe_config(corpus, tmp_path / "ac", *steps, "train.strategy=ddp",
                                               "train.activation_checkpointing=full"))
    # rows group into micro-batches otherwise than on one rank, and the router losses are per micro-batch
    assert ddp.losses == pytest.approx(single.losses, rel=1e-4)
    assert recomputed.losses == pytest.approx(ddp.losses, rel=1e-6)
    for a, b in zip(*((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("ddp", "ac"))):
        # what recomputation records in backward does not reach the next micro-batch's router loss
        assert json.loads(b)["moe/router_loss"] == pytest.approx(json.loads(a)["moe/router_loss"], rel=1e-6)
    for strategy in ("fsdp", "zero3"):  # experts sharded as any other parameter, gathered for the block's forward
        sharded, _ = spawn(train, 2, moe_config(corpus, tmp_path / strategy, *steps, f"train.strategy={strategy}"))
        assert sharded.losses == pytest.approx(ddp.losses, rel=1e-6), strategy


@pytest.mark.slow
def test_expert_parallel_follows_ddp_and_the_single_process_run_and_resumes_under_ddp(corpus, tmp_path):
    """ep=2 × dp=2 on 4 ranks: each rank holds 2 of the 4 experts of every layer."""
    common = ("train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=10", "checkpoint.every=5")
    [single] = spawn(train, 1, moe_config(corpus, tmp_path / "single", *common))
    ddp = spawn(train, 4, moe_config(corpus, tmp_path / "ddp", *common, "train.strategy=ddp",
                                     "checkpoint.save_final=true"))
    ep = spawn(train, 4, moe_config(corpus, tmp_path / "ep", *common, "train.strategy=ddp", "parallel.ep=2",
                                    "checkpoint.save_final=true"))
    assert all(r.losses == ep[0].losses for r in ep)  # every rank reports the global loss
    np.testing.assert_allclose(ep[0].losses, ddp[0].losses, rtol=1e-5)
    np.testing.assert_allclose(ep[0].losses, single.losses, rtol=1e-4)
    assert ep[0].losses[-1] < ep[0].losses[0] - 0.2

    ep_weights, ddp_weights = final_weights(ep[0]), final_weights(ddp[0])  # whole experts, plain names
    assert ep_weights.keys() == ddp_weights.keys()
    assert_weights_follow(ep_weights, ddp_weights)

    # the ep checkpoint of step 5 resumes under plain ddp (whole experts, plain names) and goes on the same way
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ep" / "checkpoints" / "step_000005", resumed / "checkpoints" / "step_000005")
    (resumed / "checkpoints" / "latest").write_text("step_000005")
    again = spawn(train, 4, moe_config(corpus, resumed, *common, "train.strategy=ddp"))
    np.testing.assert_allclose(again[0].losses, ep[0].losses[5:], rtol=1e-5)
    # and the ddp checkpoint of step 5 resumes under ep (each rank takes its experts' part)
    shutil.rmtree(resumed)
    shutil.copytree(tmp_path / "ddp" / "checkpoints" / "step_000005", resumed / "checkpoints" / "step_000005")
    (resumed / "checkpoints" / "latest").write_text("step_000005")
    again = spawn(train, 4, moe_config(corpus, resumed, *common, "train.strategy=ddp", "parallel.ep=2"))
    np.testing.assert_allclose(again[0].losses, ddp[0].losses[5:], rtol=1e-5)



def test_expert_parallel_on_two_ranks_follows_ddp(corpus, tmp_path):
    """ep=2, dp=1, with accumulation, activation checkpointing (its recomputation redoes the all-to-alls)
    and evaluation: the fast check (the 4-rank one above is marked slow)."""
    common = ("train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=2",
              "train.eval_steps=2")
    ddp, _ = spawn(train, 2, moe_config(corpus, tmp_path / "ddp", *common, "train.strategy=ddp"))
    ep, _ = spawn(train, 2, moe_config(corpus, tmp_path / "ep", *common, "train.strategy=ddp", "parallel.ep=2",
                                       "train.activation_checkpointing=full"))
    np.testing.assert_allclose(ep.losses, ddp.losses, rtol=1e-6)  # ddp follows one process: tests above
    assert ep.eval_loss == pytest.approx(ddp.eval_loss, rel=1e-6)  # each rank evaluates its own batches


def test_aux_loss_free_balancing_keeps_ranks_in_step_and_saves_the_biases(corpus, tmp_path):
    raw = moe_config(corpus, tmp_path, "train.max_steps=3", "train.strategy=ddp", "checkpoint.save_final=true",
                     "model.router_bias_update_rate=0.05", "model.router_aux_loss_coef=0")
    rank0, rank1 = spawn(train, 2, raw)
    assert rank0.losses == rank1.losses
    bias = final_weights(rank0)["stack.layers.0.mlp.expert_bias"]
    assert bias.abs().max() > 0 and (bias / 0.05).round().abs().max() <= 3  # whole steps of 0.05, three at most
