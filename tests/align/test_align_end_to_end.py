"""End to end on real data: pretrain a tiny model briefly, SFT it on instructions, DPO it on pairs.

Held-out SFT loss must fall from the pretrained model to the SFT model, and on held-out pairs the
DPO model must prefer the chosen answer more often than the SFT model it started from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.config import merge, parse_overrides
from data.shards import REFERENCE_LOGPS
from tests.distributed.runs import partition_everything
from tests.distributed.spawn import spawn
from trainer.config import RunConfig
from trainer.run import RunResult, run

SEQ_LEN = 96
MODEL = {"preset": "tiny-llama", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 176,
         "max_seq_len": 128}


def config(run_dir: Path, data: tuple[Path, Path], *overrides: str) -> dict[str, Any]:
    raw = {
        "model": dict(MODEL),
        "data": {"train": str(data[0]), "valid": str(data[1]), "seq_len": SEQ_LEN, "num_workers": 0},
        "train": {"micro_batch_size": 16, "max_steps": 20, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "seed": 0},
        "checkpoint": {"keep_last": 1},
        "log": {"dir": str(run_dir), "progress": False},
    }
    return merge(raw, parse_overrides(list(overrides)))


def train(raw: dict[str, Any], task: str) -> RunResult:
    return run(RunConfig.from_dict(raw), task)


def run_once(raw: dict[str, Any], task: str) -> RunResult:
    [result] = spawn(train, 1, raw, task, timeout=300)
    return result


@dataclasses.dataclass(frozen=True)
class Pipeline:
    pretrained: Path
    sft: Path


@pytest.fixture(scope="module")
def pipeline(align_corpus, tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp("pipeline")
    pretrained = run_once(config(root / "pretrain", align_corpus.text, "train.max_steps=80"), "pretrain")
    sft = run_once(
        config(root / "sft", align_corpus.sft, f"model.init={pretrained.checkpoint}", "train.max_steps=100",
               "train.lr=2e-3", "data.packing=true"),
        "sft",
    )
    return Pipeline(pretrained.checkpoint / "model", sft.checkpoint / "model")


def loader(corpus, kind: str, batch_size: int = 25):
    from data.config import DataConfig
    from data.loader import build_loader
    from data.tokenizer import load_tokenizer

    train_dir, valid_dir = corpus.sft if kind == "sft" else corpus.pairs
    cfg = DataConfig(train=str(train_dir), valid=str(valid_dir), seq_len=SEQ_LEN, num_workers=0)
    return build_loader(cfg, objective=kind, tokenizer=load_tokenizer(corpus.tokenizer), rank=0, world_size=1,
                        micro_batch_size=batch_size, seed=0, split="valid")


def load(model_dir: Path) -> torch.nn.Module:
    from model.io import load_pretrained

    return load_pretrained(model_dir).eval()


@torch.no_grad()
def held_out_sft_loss(corpus, model_dir: Path) -> float:
    from trainer.objectives.clm import CausalLM

    model, objective, total, count = load(model_dir), CausalLM("sft", 0), 0.0, 0
    for batch in loader(corpus, "sft"):
        out = objective.loss(model, batch)
        total, count = total + float(out.loss_sum), count + int(out.count)
    return total / count


@torch.no_grad()
def held_out_preferences(corpus, policy_dir: Path, reference_dir: Path, beta: float = 0.1) -> dict[str, float]:
    """On the held-out pairs: the share where the DPO implicit reward favours the chosen answer (ties
    count half, so policy == reference gives 0.5), the mean DPO loss, and the share where the policy
    gives the chosen answer more log-probability outright."""
    from trainer.objectives.preference import pair_logps

    policy, reference = load(policy_dir), load(reference_dir)
    margins, logp_wins = [], 0
    for batch in loader(corpus, "preference"):
        p, r = pair_logps(policy, batch), pair_logps(reference, batch)
        margins.append(beta * ((p.chosen - r.chosen) - (p.rejected - r.rejected)))
        logp_wins += int((p.chosen > p.rejected).sum())
    margin = torch.cat(margins)
    return {
        "reward_accuracy": float((margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()),
        "dpo_loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
        "logp_accuracy": logp_wins / len(margin),
        "pairs": len(margin),
    }


@pytest.mark.slow
def test_sft_lowers_held_out_loss(align_corpus, pipeline):
    before = held_out_sft_loss(align_corpus, pipeline.pretrained)
    after = held_out_sft_loss(align_corpus, pipeline.sft)
    print(f"held-out SFT loss: pretrained {before:.3f} -> SFT {after:.3f}")
    assert after < before - 0.5


@pytest.mark.slow
def test_dpo_raises_held_out_preference_accuracy(align_corpus, pipeline, tmp_path):
    raw = config(tmp_path, align_corpus.pairs, f"model.init={pipeline.sft}", "train.max_steps=60",
                 "train.micro_batch_size=8", "train.lr=1e-3", "train.warmup_steps=5", "align.beta=0.1",
                 "align.reference=precomputed")
    result = run_once(raw, "align")
    before = held_out_preferences(align_corpus, pipeline.sft, pipeline.sft)
    after = held_out_preferences(align_corpus, result.checkpoint / "model", pipeline.sft)
    print(f"held-out pairs ({after['pairs']}): reward accuracy {before['reward_accuracy']:.2f} -> "
          f"{after['reward_accuracy']:.2f}, DPO loss {before['dpo_loss']:.4f} -> {after['dpo_loss']:.4f}, "
          f"chosen more likely {before['logp_accuracy']:.2f} -> {after['logp_accuracy']:.2f}")
    assert before["reward_accuracy"] == 0.5 and before["dpo_loss"] == pytest.approx(np.log(2))
    assert after["reward_accuracy"] > 0.65
    assert after["dpo_loss"] < before["dpo_loss"] - 0.02
    assert result.losses[-1] < result.losses[0]
    assert (align_corpus.pairs[0] / "reference_logps.npy").is_file()


@pytest.mark.slow
def test_live_reference_equals_precomputed(align_corpus, pipeline, tmp_path):
    common = (f"model.init={pipeline.sft}", "train.max_steps=4", "train.micro_batch_size=8",
              "checkpoint.save_final=false")
    precomputed = run_once(config(tmp_path / "pre", align_corpus.pairs, *common, "align.reference=precomputed"),
                           "align")
    live = run_once(config(tmp_path / "live", align_corpus.pairs, *common, "align.reference=live"), "align")
    np.testing.assert_allclose(live.losses, precomputed.losses, rtol=1e-5)
    assert precomputed.losses[0] == pytest.approx(np.log(2), rel=1e-5)  # policy == reference at step 1


@pytest.fixture(scope="module")
def single_process_dpo(align_corpus, pipeline, tmp_path_factory) -> list[float]:
    raw = config(tmp_path_factory.mktemp("dpo_single"), align_corpus.pairs, *DIST_RUN, f"model.init={pipeline.sft}")
    return run_once(raw, "align").losses


DIST_RUN = ("train.max_steps=4", "train.micro_batch_size=4", "train.global_batch_size=8", "align.reference=live",
            "checkpoint.save_final=false")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_live_reference_matches_single_process(align_corpus, pipeline, single_process_dpo, tmp_path,
                                                       strategy):
    # fresh copies: log-probs other tests stored next to the shards must not stand in for the live reference
    pairs = tuple(Path(shutil.copytree(d, tmp_path / "pairs" / d.name, ignore=shutil.ignore_patterns(REFERENCE_LOGPS)))
                  for d in align_corpus.pairs)
    extra = (partition_everything(tmp_path),) if strategy == "zero3" else ()  # the reference's parameters too
    raw = config(tmp_path, pairs, *DIST_RUN, f"model.init={pipeline.sft}", f"train.strategy={strategy}", *extra)
    rank0, rank1 = spawn(train, 2, raw, "align", timeout=300)
    assert rank0.losses == rank1.losses
    np.testing.assert_allclose(rank0.losses, single_process_dpo, rtol=1e-4)


@torch.no_grad()
def held_out_reward_accuracy(corpus, model: torch.nn.Module) -> float:
    from trainer.objectives.reward import RewardObjective

    wins, n = 0.0, 0
    for batch in loader(corpus, "preference"):
        out = RewardObjective().loss(model.eval(), batch)
        wins, n = wins + float(out.metrics["rewards/accuracies"]), n + int(out.count)
    return wins / n


@pytest.mark.slow
def test_reward_model_learns_held_out_preferences(align_corpus, pipeline, tmp_path):
    from model.io import load_pretrained

    raw = config(tmp_path, align_corpus.pairs, f"model.init={pipeline.sft}", "train.objective=reward",
                 "train.max_steps=150", "train.micro_batch_size=8", "train.lr=1e-3")
    result = run_once(raw, "align")
    torch.manual_seed(0)  # the run's seed: the same fresh score head on the SFT body
    before = held_out_reward_accuracy(align_corpus, load_pretrained(pipeline.sft, head="classifier"))
    after = held_out_reward_accuracy(align_corpus, load(result.checkpoint / "model"))
    print(f"held-out reward-model accuracy: {before:.2f} -> {after:.2f}")
    # measured here: 0.51 -> 0.86 after 150 steps (60 steps gave 0.61 here and passed elsewhere: a
    # margin inside the spread between CPUs); the bar, 0.1 above chance, leaves 0.25 of room
    assert after > max(before, 0.5) + 0.1


@pytest.mark.slow
def test_all_masked_sft_batches_are_skipped_not_trained(align_corpus, tmp_path):
    """With seq_len 4 every conversation is cut inside its prompt: no step may train on loss 0."""
    from tests.distributed.spawn import RanksFailed

    raw = config(tmp_path, align_corpus.sft, "data.seq_len=4", "train.max_steps=5", "train.max_bad_steps=2",
                 "checkpoint.save_final=false")
    with pytest.raises(RanksFailed, match=r"TrainingDiverged.*3 steps skipped.*no target tokens"):
        run_once(raw, "sft")


@pytest.mark.slow
def test_precompute_on_two_ranks_equals_one(align_corpus, pipeline, tmp_path):
    """Each rank scores every other pair; the gathered file equals the single-process one."""
    import shutil

    files = {}
    for ranks, strategy in ((1, "single"), (2, "ddp")):
        held_out = align_corpus.pairs[1]  # 100 pairs: train and valid are copies of it, to keep this short
        pairs = tuple(shutil.copytree(held_out, tmp_path / f"{ranks}_{split}") for split in ("train", "valid"))
        raw = config(tmp_path / f"run{ranks}", pairs, f"model.init={pipeline.sft}", f"train.strategy={strategy}",
                     "train.max_steps=1", "train.micro_batch_size=6", "align.reference=precomputed",
                     "checkpoint.save_final=false")
        spawn(train, ranks, raw, "align", timeout=300)
        files[ranks] = [np.load(d / "reference_logps.npy") for d in pairs]
    for one, two in zip(files[1], files[2]):
        assert one.shape == two.shape and (one < 0).all()
        np.testing.assert_allclose(two, one, rtol=1e-5)
    # another starting model makes the stored values stale: they are computed again
    raw = config(tmp_path / "again", pairs, f"model.init={pipeline.pretrained}", "train.max_steps=1",
                 "train.micro_batch_size=6", "align.reference=precomputed", "checkpoint.save_final=false")
    spawn(train, 1, raw, "align", timeout=300)
    assert not np.allclose(np.load(pairs[0] / "reference_logps.npy"), files[2][0])


@pytest.mark.slow
def test_kto_raises_held_out_preference_accuracy(align_corpus, pipeline, tmp_path):
    """The training pairs split into unpaired examples (chosen desirable, rejected undesirable, TRL's
    KTO format); KTO must then favour the held-out chosen answers by its implicit reward."""
    from data.make_shards import make_shards

    pairs = json.loads((align_corpus.root / "pairs_train.json").read_text())
    unpaired = [{"prompt": f"{p['instruction']}\n\n{p['input']}" if p["input"] else p["instruction"],
                 "completion": p[side], "label": side == "chosen"} for p in pairs for side in ("chosen", "rejected")]
    source = tmp_path / "unpaired.json"
    source.write_text(json.dumps(unpaired))
    make_shards([str(source)], align_corpus.tokenizer, tmp_path / "unpaired", kind="unpaired", shard_bytes=64 << 10)
    raw = config(tmp_path / "run", (tmp_path / "unpaired", tmp_path / "unpaired"), f"model.init={pipeline.sft}",
                 "train.max_steps=30", "train.micro_batch_size=16", "train.lr=1e-3", "train.warmup_steps=5",
                 "align.loss=kto", "align.beta=0.1")
    raw["data"].pop("valid")
    result = run_once(raw, "align")
    after = held_out_preferences(align_corpus, result.checkpoint / "model", pipeline.sft)
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    margins = [m["rewards/chosen"] - m["rewards/rejected"] for m in steps]
    print(f"KTO: held-out reward accuracy 0.50 -> {after['reward_accuracy']:.2f}; train reward margin "
          f"{np.mean(margins[:10]):.3f} -> {np.mean(margins[-10:]):.3f}; kl {steps[-1]['kl']:.3f}")
    assert after["reward_accuracy"] > 0.6
    assert np.mean(margins[-10:]) > np.mean(margins[:10])
