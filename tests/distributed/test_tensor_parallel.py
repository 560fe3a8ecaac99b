"""Tensor parallel (parallel.tp) through the real trainer follows ddp and the single-process run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from spawn import spawn

from runs import assert_weights_follow, final_weights, tiny_config, train


@pytest.mark.slow
def test_tensor_parallel_follows_ddp_and_the_single_process_run(corpus, tmp_path):
    """tp=2 × dp=2 on 4 ranks (2 "nodes"): each rank holds half of every block's heads and MLP units;
    the two ranks of a tp group read the same batch, so the global batch is 2 groups' micro-batches."""
    dense = {"preset": "tiny-llama", "d_model": 32, "n_heads": 8, "n_kv_heads": 4, "d_ff": 64, "max_seq_len": 64}
    common = ("train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=10",
              "checkpoint.save_final=true")

    def config(name, *overrides):
        raw = tiny_config(corpus, tmp_path / name, *common, *overrides)
        raw["model"] = dict(dense)
        return raw

    [single] = spawn(train, 1, config("single"))
    ddp, _ = spawn(train, 2, config("ddp", "train.strategy=ddp"))
    # two simulated nodes of 2 ranks: tp inside a node, dp across
    tp = spawn(train, 4, config("tp", "train.strategy=ddp", "parallel.tp=2", "checkpoint.every=5"),
               env={"LOCAL_WORLD_SIZE": "2"})
    assert all(r.losses == tp[0].losses for r in tp)
    np.testing.assert_allclose(tp[0].losses, ddp.losses, rtol=1e-5)
    np.testing.assert_allclose(tp[0].losses, single.losses, rtol=1e-4)
    assert tp[0].tokens_seen == ddp.tokens_seen  # the tp copies of a batch count once
    tp_weights, ddp_weights = final_weights(tp[0]), final_weights(ddp)  # whole tensors, plain layout
    assert tp_weights.keys() == ddp_weights.keys()
    assert_weights_follow(tp_weights, ddp_weights)

    # the step-5 checkpoint (each rank wrote its pieces) resumes at dp=4 (ddp and fsdp, micro-batch 2: one
    # loader state per tp group), at tp=4 and at tp=2 × dp=2 under fsdp, and goes on as uninterrupted
    resumes = {"dp4_ddp": ("train.strategy=ddp", "train.micro_batch_size=2"),
               "dp4_fsdp": ("train.strategy=fsdp", "train.micro_batch_size=2"),
               "tp4": ("train.strategy=ddp", "parallel.tp=4", "train.micro_batch_size=8"),
               "tp2_fsdp": ("train.strategy=fsdp", "parallel.tp=2")}
    for name, overrides in resumes.items():
        resumed = tmp_path / name
        shutil.copytree(tmp_path / "tp" / "checkpoints" / "step_000005", resumed / "checkpoints" / "step_000005")
        (resumed / "checkpoints" / "latest").write_text("step_000005")
        again = spawn(train, 4, config(name, *overrides), env={"LOCAL_WORLD_SIZE": "2"} if name == "tp2_fsdp" else None)
        np.testing.assert_allclose(again[0].losses, tp[0].losses[5:], rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "encoder_decoder"])
def test_tensor_parallel_splits_biases_ungated_mlps_and_cross_attention(corpus, tmp_path, arch):
    """tp=2 on 2 ranks (dp=1): GPT-2's biased, ungated blocks; an encoder-decoder's cross-attention."""
    model = {"gpt2": {"preset": "tiny-gpt2", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
             "encoder_decoder": {"preset": "tiny-t5", "pos": "sinusoidal", "d_model": 32, "n_heads": 2, "d_ff": 64,
                                 "max_seq_len": 64}}[arch]
    common = ("train.max_steps=4", "checkpoint.save_final=false")
    raws = [tiny_config(corpus, tmp_path / name, *common, *extra)
            for name, extra in (("single", ()), ("tp", ("train.strategy=ddp", "parallel.tp=2")))]
    for raw in raws:
        raw["model"] = dict(model)
    [single] = spawn(train, 1, raws[0])
    tp, _ = spawn(train, 2, raws[1])
    np.testing.assert_allclose(tp.losses, single.losses, rtol=1e-5)
