"""GRPO on 2 ranks: ddp, fsdp and zero3 (every parameter partitioned) sample the same completions and
reach the same losses. Each rank samples with train.seed + rank; under fsdp and zero3 the rollouts run
on the sharded policy (every forward gathers), every rank taking all max_new_tokens steps so their
collective forwards line up."""

import json

import numpy as np
import pytest
from runs import partition_everything, tiny_config, train
from spawn import spawn

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


def grpo(corpus, prompts, run_dir, strategy):
    extra = (partition_everything(run_dir),) if strategy == "zero3" else ()
    raw = tiny_config(corpus, run_dir, f"train.strategy={strategy}", *extra, *SETTINGS)
    raw["data"]["train"], raw["data"]["valid"] = str(prompts), None
    raw["align"]["reward"] = ["exact_match", "regex:[0-9]"]  # an untrained model writes digits now and then
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
