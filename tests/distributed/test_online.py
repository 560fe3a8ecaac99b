"""GRPO on 2 ranks: ddp, fsdp and zero3 (every parameter partitioned) sample the same completions and
reach the same losses. Each rank samples with train.seed + rank; under fsdp and zero3 the rollouts run
on the sharded policy (every forward gathers), every rank taking all max_new_tokens steps so their
collective forwards line up."""

import json
import signal

import numpy as np
import pytest
import torch
from runs import KillAt, final_weights, partition_everything, tiny_config, train
from spawn import RanksFailed, spawn

STEPS = 3
SETTINGS = (f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.lr=1e-2", "checkpoint.save_final=false",
            "align.loss=grpo", "align.num_generations=4", "align.max_new_tokens=4",
            "align.beta=0.04", "align.loss_aggregation=dapo", "data.seq_len=24")


@pytest.fixture(scope="module")
def prompts(corpus, tmp_path_factory):
    from data.make_shards import make_shards

    root = tmp_path_factory.mktemp("prompts")
    records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 18) for b in range(10, 18)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    make_shards([str(root / "prompts.jsonl")], corpus.tokenizer, root / "shards", kind="prompt")
    return root / "shards"


def grpo_config(corpus, prompts, run_dir, strategy, *overrides):
    extra = (partition_everything(run_dir),) if strategy == "zero3" else ()
    raw = tiny_config(corpus, run_dir, f"train.strategy={strategy}", *extra, *SETTINGS, *overrides)
    raw["data"]["train"], raw["data"]["valid"] = str(prompts), None
    raw["align"]["reward"] = ["exact_match", "regex:[0-9]"]  # an untrained model writes digits now and then
    return raw


def grpo(corpus, prompts, run_dir, strategy):
    rank0, rank1 = spawn(train, 2, grpo_config(corpus, prompts, run_dir, strategy), "align")
    assert rank0.losses == rank1.losses
    return rank0


@pytest.fixture(scope="module")
def ddp(corpus, prompts, tmp_path_factory):
    return grpo(corpus, prompts, tmp_path_factory.mktemp("ddp"), "ddp")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_rollouts_follow_ddp(corpus, prompts, ddp, tmp_path, strategy):
    sharded = grpo(corpus, prompts, tmp_path, strategy)
    np.testing.assert_allclose(sharded.losses, ddp.losses, rtol=1e-4, atol=1e-6)
    ours = [json.loads(line) for line in (sharded.run_dir / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (ddp.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0 < np.mean([m["reward"] for m in theirs]) < 1 and theirs[-1]["kl"] > 0  # something to compare
    for name in ("reward", "completions/mean_length", "kl"):
        np.testing.assert_allclose([m[name] for m in ours], [m[name] for m in theirs], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sigkill_then_restart_samples_and_ends_as_uninterrupted(corpus, prompts, tmp_path):
    """The sampler's state is in each rank's checkpoint file: after a crash the restarted run draws
    the same completions and ends with bitwise the same weights."""
    common = ("train.max_steps=4", "checkpoint.every=2", "checkpoint.save_final=true")
    straight = spawn(train, 2, grpo_config(corpus, prompts, tmp_path / "straight", "ddp", *common), "align")[0]
    crashed = grpo_config(corpus, prompts, tmp_path / "crashed", "ddp", *common)
    with pytest.raises(RanksFailed) as info:
        spawn(train, 2, crashed, "align", (KillAt(step=3, rank=1),))
    assert f"rank 1 died with exit code {-signal.SIGKILL}" in str(info.value)
    resumed = spawn(train, 2, crashed, "align")[0]
    assert resumed.steps == 4 and resumed.losses == straight.losses[-2:]
    expected, got = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
