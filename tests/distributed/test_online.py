"""GRPO (and PPO) on 2 ranks: ddp, fsdp and zero3 (every parameter partitioned) sample the same completions and
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
PPO = ("align.loss=ppo", "align.num_generations=2", "align.num_iterations=2", "align.gamma=0.9",
       "checkpoint.save_final=true")
PPO_REWARD = ["regex:[0-9]", "regex:[aeiou]"]  # a fresh model's completions hold a vowel about half the time


@pytest.fixture(scope="module")
def prompts(corpus, tmp_path_factory):
    from data.make_shards import make_shards

    root = tmp_path_factory.mktemp("prompts")
    records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 18) for b in range(10, 18)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    make_shards([str(root / "prompts.jsonl")], corpus.tokenizer, root / "shards", kind="prompt")
    return root / "shards"


def grpo_config(corpus, prompts, run_dir, strategy, *overrides, reward=None):
    extra = (partition_everything(run_dir),) if strategy == "zero3" else ()
    raw = tiny_config(corpus, run_dir, f"train.strategy={strategy}", *extra, *SETTINGS, *overrides)
    raw["data"]["train"], raw["data"]["valid"] = str(prompts), None
    raw["align"]["reward"] = reward or ["exact_match", "regex:[0-9]"]  # an untrained model writes digits now and then
    return raw


def grpo(corpus, prompts, run_dir, strategy, *overrides, reward=None):
    raw = grpo_config(corpus, prompts, run_dir, strategy, *overrides, reward=reward)
    rank0, rank1 = spawn(train, 2, raw, "align")
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
@pytest.mark.parametrize("loss", ["grpo", "ppo"])
def test_sigkill_then_restart_samples_and_ends_as_uninterrupted(corpus, prompts, tmp_path, loss):
    """The sampler's state is in each rank's checkpoint file: after a crash the restarted run draws
    the same completions and ends with bitwise the same weights (PPO: and the same value heads)."""
    common = ("train.max_steps=4", "checkpoint.every=2", "checkpoint.save_final=true", *(PPO if loss == "ppo" else ()))
    reward = PPO_REWARD if loss == "ppo" else None
    straight = spawn(train, 2, grpo_config(corpus, prompts, tmp_path / "straight", "ddp", *common, reward=reward),
                     "align")[0]
    crashed = grpo_config(corpus, prompts, tmp_path / "crashed", "ddp", *common, reward=reward)
    with pytest.raises(RanksFailed) as info:
        spawn(train, 2, crashed, "align", (KillAt(step=3, rank=1),))
    assert f"rank 1 died with exit code {-signal.SIGKILL}" in str(info.value)
    resumed = spawn(train, 2, crashed, "align")[0]
    assert resumed.steps == 4 and resumed.losses == straight.losses[-2:]
    expected, got = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    if loss == "ppo":
        from trainer.checkpoint import load_rank_state, rank_file

        for r in (0, 1):
            heads = [load_rank_state(run.checkpoint / rank_file(r))["objective"]["value"]["head"]["score.weight"]
                     for run in (straight, resumed)]
            assert torch.equal(*heads)



@pytest.fixture(scope="module")
def ppo_ddp(corpus, prompts, tmp_path_factory):
    return grpo(corpus, prompts, tmp_path_factory.mktemp("ppo_ddp"), "ddp", *PPO, reward=PPO_REWARD)


def test_ppo_value_head_is_one_across_ranks(ppo_ddp):
    """Each rank holds the value head outside the strategy's model: its gradients are averaged over
    the ranks, so both ranks' copies (in their checkpoint files) stay the same, and it learns."""
    from trainer.checkpoint import load_rank_state, rank_file

    heads = [load_rank_state(ppo_ddp.checkpoint / rank_file(r))["objective"]["value"]["head"] for r in (0, 1)]
    assert torch.equal(heads[0]["score.weight"], heads[1]["score.weight"])
    assert heads[0]["score.weight"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_ppo_follows_ddp(corpus, prompts, ppo_ddp, tmp_path, strategy):
    """The value head runs inside the sharded forward (beside the gathered LM head)."""
    sharded = grpo(corpus, prompts, tmp_path, strategy, *PPO, reward=PPO_REWARD)
    np.testing.assert_allclose(sharded.losses, ppo_ddp.losses, rtol=1e-4, atol=1e-6)
    ours = [json.loads(line) for line in (sharded.run_dir / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (ppo_ddp.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([m["reward"] for m in theirs]) > 0 and theirs[-1]["loss/value_avg"] > 1e-3
    assert theirs[-1]["val/vpred"] != 0
    for name in ("reward", "kl", "loss/value_avg", "val/vpred", "objective/kl"):
        np.testing.assert_allclose([m[name] for m in ours], [m[name] for m in theirs], rtol=1e-4, atol=1e-6)
