"""Pipeline parallel (parallel.pp) through the real trainer follows the single-process run and resumes
across pipeline sizes (checkpoints hold the plain model's names)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from spawn import spawn

from model import ModelConfig, build_model
from model.transformer import resolve_positions
from runs import assert_weights_follow, final_weights, tiny_config, train
from trainer.callbacks import Callback
from trainer.strategy.pipeline_parallel import StagePart, stage_blocks

# 4 blocks: room for 2 stages per rank with pp=2; the embeddings and the head on different stages
MODEL = {"preset": "tiny-llama", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 64,
         "n_layers": 4, "tie_embeddings": False}


def test_stages_split_like_torchtitan_and_chain_to_the_model_forward():
    """The embeddings and the head weigh one block each; the stages, run one after the other with the
    document ids and positions each, give the plain model's hidden states exactly."""
    assert stage_blocks(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_blocks(4, 3) == [range(0, 1), range(1, 3), range(3, 4)]
    assert stage_blocks(4, 4) == [range(0, 1), range(1, 3), range(3, 4), range(4, 4)]  # the head alone
    assert stage_blocks(5, 2) == [range(0, 3), range(3, 5)]
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**MODEL, "vocab_size": 64})).eval()
    parts = [StagePart(model, blocks, i == 0, i == 2) for i, blocks in enumerate(stage_blocks(4, 3))]
    names = [name for part in parts for name, _ in part.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    input_ids = torch.randint(64, (2, 12))
    document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    positions = resolve_positions(input_ids, None, document_ids, None)
    with torch.no_grad():
        expected = model(input_ids, document_ids=document_ids, return_hidden=True)
        hidden = input_ids
        for part in parts:
            hidden = part(hidden, position_ids=positions, document_ids=document_ids)
        assert torch.equal(hidden, expected)
        # a later stage without the document ids lets tokens attend across documents
        leaky = parts[2](parts[1](parts[0](input_ids, position_ids=positions, document_ids=document_ids),
                                  position_ids=positions), position_ids=positions)
        assert not torch.allclose(leaky, expected)


class RecordStages(Callback):
    """Keeps the names of the parameters this rank trains (its stages')."""

    def on_train_start(self, trainer) -> None:
        self.names = sorted(name for name, _ in trainer.strategy.model.named_parameters())


def stage_names(raw):
    """What each rank runs: the run's result and the parameter names its stages hold."""
    callback = RecordStages()
    return train(raw, "pretrain", (callback,)), callback.names


def config(corpus, run_dir, *overrides, tied: bool = False):
    raw = tiny_config(corpus, run_dir, "train.micro_batch_size=4", "train.max_steps=10", *overrides)
    raw["model"] = {**MODEL, "tie_embeddings": tied}
    return raw


def resume_from(source, run_dir, step: int) -> None:
    """Make ``run_dir`` hold ``source``'s checkpoint of ``step`` as its latest."""
    name = f"step_{step:06d}"
    shutil.copytree(source / "checkpoints" / name, run_dir / "checkpoints" / name)
    (run_dir / "checkpoints" / "latest").write_text(name)


def test_two_stage_pipeline_follows_the_single_process_run_and_resumes_across_pp(corpus, tmp_path):
    """pp=2 with 1F1B on 2 ranks: rank 0 holds the embeddings and blocks 0-1, rank 1 blocks 2-3 and the
    head; 2 micro-batches per step. Its step-5 checkpoint resumes at pp=2 (equal to the uninterrupted run)
    and at pp=1; the single run's resumes at pp=2."""
    common = ("train.global_batch_size=8", "checkpoint.every=5", "train.eval_every=5")
    pp_args = ("train.strategy=ddp", "parallel.pp=2", "parallel.pp_schedule=1F1B")
    [single] = spawn(train, 1, config(corpus, tmp_path / "single", *common))
    (pp, first), (pp1, second) = spawn(stage_names, 2, config(corpus, tmp_path / "pp", *common, *pp_args))
    assert pp.losses == pp1.losses  # every rank reports the last stage's loss
    np.testing.assert_allclose(pp.losses, single.losses, rtol=1e-4)
    assert pp.losses[-1] < pp.losses[0]
    assert pp.eval_loss == pp1.eval_loss  # evaluated through the pipeline (forward only)
    np.testing.assert_allclose(pp.eval_loss, single.eval_loss, rtol=1e-5)
    assert "embed.tokens.weight" in first and "stack.layers.1.attn.qkv.weight" in first and "head.weight" in second
    assert not set(first) & set(second)  # the stages share no parameter
    expected, got = final_weights(single), final_weights(pp)  # gathered whole, under the plain names
    assert expected.keys() == got.keys() and set(first) | set(second) <= set(got)
    assert_weights_follow(got, expected)

    resume_from(tmp_path / "pp", tmp_path / "pp_again", 5)
    again, _ = spawn(train, 2, config(corpus, tmp_path / "pp_again", *common, *pp_args))
    assert again.losses == pp.losses[5:]
    resume_from(tmp_path / "pp", tmp_path / "pp_to_single", 5)
    [at_one] = spawn(train, 1, config(corpus, tmp_path / "pp_to_single", *common))
    np.testing.assert_allclose(at_one.losses, single.losses[5:], rtol=1e-4)
    resume_from(tmp_path / "single", tmp_path / "single_to_pp", 5)
    at_two, _ = spawn(train, 2, config(corpus, tmp_path / "single_to_pp", *common, *pp_args))
    np.testing.assert_allclose(at_two.losses, single.losses[5:], rtol=1e-4)


def layer(i: int) -> str:
    return f"stack.layers.{i}.attn.qkv.weight"


# stages (embeddings, block 0), (blocks 1-2), (block 3), (norm, head): looped, stage i on pp rank i % 2; V-shaped,
# stages 0 and 3 on pp rank 0. Per schedule: names on pp rank 0, on pp rank 1, and on both (the tied weight)
LAYOUTS = {
    "Interleaved1F1B": ({layer(0), layer(3)}, {layer(1), layer(2), "stack.final_norm.weight"}, {"embed.tokens.weight"}),
    "ZBVZeroBubble": ({"embed.tokens.weight", layer(0), "stack.final_norm.weight"}, {layer(1), layer(2), layer(3)},
                      set()),
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", LAYOUTS)
def test_two_stages_per_rank_with_data_parallel_and_tied_embeddings_follow_the_single_process_run(
        corpus, tmp_path, schedule):
    """pp=2 × dp=2 on 4 ranks, 2 stages per pp rank: each pipeline reads its own 2 micro-batches, the
    global batch is 16. The embeddings are tied to the head: where the first and the last stage are on
    two ranks, each holds them and they sum their gradients. The step-5 checkpoint resumes in one process."""
    common = ("train.global_batch_size=16", "checkpoint.every=5", "train.eval_every=5")
    [single] = spawn(train, 1, config(corpus, tmp_path / "single", *common, tied=True))
    ddp, _ = spawn(train, 2, config(corpus, tmp_path / "ddp", *common, "train.strategy=ddp", tied=True))
    ranks = spawn(stage_names, 4, config(corpus, tmp_path / "pp", *common, "train.strategy=ddp", "parallel.pp=2",
                                         f"parallel.pp_schedule={schedule}", tied=True))
    results, names = zip(*ranks)
    assert all(r.losses == results[0].losses for r in results)
    np.testing.assert_allclose(results[0].losses, single.losses, rtol=1e-4)
    assert results[0].tokens_seen == single.tokens_seen  # the stages of a pipeline count its batch once
    # each of the 2 pipelines evaluates its own validation batches, as each of 2 ddp ranks does
    np.testing.assert_allclose(results[0].eval_loss, ddp.eval_loss, rtol=1e-5)
    # the ranks are (dp, pp), pp inner: the dp replicas hold the same stages
    first, second, shared = LAYOUTS[schedule]
    assert names[0] == names[2] and names[1] == names[3]
    assert first <= set(names[0]) and second <= set(names[1]) and set(names[0]) & set(names[1]) == shared
    expected, got = final_weights(single), final_weights(results[0])
    assert expected.keys() == got.keys()
    assert_weights_follow(got, expected)

    resume_from(tmp_path / "pp", tmp_path / "pp_to_single", 5)
    [at_one] = spawn(train, 1, config(corpus, tmp_path / "pp_to_single", *common, tied=True))
    np.testing.assert_allclose(at_one.losses, single.losses[5:], rtol=1e-4)


EXAMPLES = Path(__file__).parents[2] / "examples" / "data"


def _shards(corpus, root: Path, source: str, kind: str) -> Path:
    """The first 200 records of ``source`` as ``kind`` shards under the corpus tokenizer: train/ and valid/."""
    from data.make_shards import make_shards

    root.mkdir(parents=True, exist_ok=True)
    records = json.loads((EXAMPLES / source).read_text())
    for split, part in (("train", records[:160]), ("valid", records[160:200])):
        (root / f"{split}.json").write_text(json.dumps(part))
        make_shards([str(root / f"{split}.json")], corpus.tokenizer, root / split, kind=kind, shard_bytes=8 << 10)
    return root


@pytest.fixture(scope="module")
def chats(corpus, tmp_path_factory) -> Path:
    """Instruction-following conversations (33 to 173 tokens) as SFT shards."""
    return _shards(corpus, tmp_path_factory.mktemp("chats"), "sft_rasbt_instruction_data.json", "sft")


def test_sft_through_two_stages_follows_the_single_process_run(corpus, chats, tmp_path):
    """SFT at pp=2 (1F1B): labels on assistant tokens only, micro-batches as wide as their longest
    conversation (most under data.seq_len=128), which the stages get right-padded to 128. The losses,
    the evaluation (forward through the pipeline, unpadded) and the final weights follow one process."""
    common = (f"data.train={chats / 'train'}", f"data.valid={chats / 'valid'}", "data.seq_len=128",
              "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=6", "train.eval_every=6",
              "checkpoint.save_final=true")

    def sft_config(name, *overrides):
        raw = config(corpus, tmp_path / name, *common, *overrides)
        raw["model"]["max_seq_len"] = 128
        return raw

    [single] = spawn(train, 1, sft_config("single"), "sft")
    pp, pp1 = spawn(train, 2, sft_config("pp", "train.strategy=ddp", "parallel.pp=2"), "sft")
    assert pp.losses == pp1.losses
    np.testing.assert_allclose(pp.losses, single.losses, rtol=1e-5)
    assert pp.tokens_seen == single.tokens_seen
    np.testing.assert_allclose(pp.eval_loss, single.eval_loss, rtol=1e-5)
    expected, got = final_weights(single), final_weights(pp)
    assert_weights_follow(got, expected)


def test_preference_alignment_through_the_pipeline_is_refused_in_one_line(corpus, tmp_path):
    """A reference-free preference loss (SimPO: no frozen model to refuse first) is refused as the ranks start,
    before the rendezvous, the model or the run directory."""
    from spawn import RanksFailed

    pairs = _shards(corpus, tmp_path / "pairs", "pref_rasbt_instruction_data_with_preference.json", "preference")
    raw = config(corpus, tmp_path / "run", f"data.train={pairs / 'train'}", "data.valid=null", "align.loss=simpo",
                 "train.global_batch_size=8", "train.strategy=ddp", "parallel.pp=2")
    with pytest.raises(RanksFailed, match=r"parallel\.pp=2 trains train\.objective=clm or sft, not preference "
                                          r"\(the objective of align\.loss=simpo\); set parallel\.pp=1 to train it$"):
        spawn(train, 2, raw, "align")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("schedule", "n_layers"), [("1F1B", 2), ("Interleaved1F1B", 4)])
def test_moe_through_the_pipeline_follows_the_single_process_run(corpus, tmp_path, schedule, n_layers):
    """tiny-moe (tied, dropless, load-balancing and z losses) at pp=2 with activation checkpointing: one MoE
    block per stage (1F1B), or 4 stages, two a rank, the last holding the head alone (Interleaved1F1B). Each
    stage's router losses reach the gradients through its own backward, so losses, weights, gradient norms and
    the ``moe/*`` metrics (over every stage's layers) follow one process."""
    moe = {"preset": "tiny-moe", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "moe_d_ff": 32, "max_seq_len": 64,
           "router_aux_loss_coef": 0.1, "router_z_loss_coef": 0.01, "n_layers": n_layers}
    common = ("train.global_batch_size=8", "train.max_steps=6", "checkpoint.save_final=true")

    def moe_config(name, *overrides):
        raw = tiny_config(corpus, tmp_path / name, *common, *overrides)
        raw["model"] = dict(moe)
        return raw

    [single] = spawn(train, 1, moe_config("single"))
    pp, _ = spawn(train, 2, moe_config("pp", "train.strategy=ddp", "parallel.pp=2", f"parallel.pp_schedule={schedule}",
                                       "train.activation_checkpointing=full"))
    np.testing.assert_allclose(pp.losses, single.losses, rtol=1e-5)
    for a, b in zip(*((tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("single", "pp"))):
        expected, got = json.loads(a), json.loads(b)
        for key in ("moe/router_loss", "moe/aux_loss", "moe/z_loss", "moe/load/0", "moe/load/3", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    expected, got = final_weights(single), final_weights(pp)
    assert_weights_follow(got, expected)
