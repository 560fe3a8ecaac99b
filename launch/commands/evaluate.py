"""`tessera eval --checkpoint DIR --data DIR`: score a model on a shard directory, by the shards' kind.

text            the pretraining loss and perplexity: causal LM (decoder), masked LM (encoder, seeded
                15% masking) or span corruption (encoder-decoder, seeded noise)
classification  accuracy and cross-entropy (and the majority-class accuracy, the trivial baseline)
seq2seq         exact match of greedy decoding against the target; teacher-forced token loss and
                token accuracy (the argmax given the true previous tokens)
preference      log-prob accuracy (the chosen answer more likely than the rejected one) and the mean
                log-prob margin; DPO's implicit-reward accuracy would need the reference model too

One line goes to stdout (stderr when the JSON does), the JSON to stdout (``--json``) or a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from data.collate import IGNORE_INDEX

KIND_OBJECTIVES = {"classification": "classify", "seq2seq": "seq2seq", "preference": "preference"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a model directory, a checkpoints/ directory (its latest), or a Hugging Face directory")
    parser.add_argument("--data", required=True, type=Path,
                        help="a shard directory (tessera shard), or one holding a sub-directory per split")
    parser.add_argument("--split", default="valid", help="the sub-directory of --data to use when it has no manifest")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0: the whole split)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per row or sample (default: the training run's data.seq_len, else max_seq_len)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the MLM / span-corruption noise of text shards")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="write the result as JSON to FILE (to stdout without FILE)")


def run(args: argparse.Namespace) -> int:
    from data.config import DataConfig
    from data.loader import build_loader
    from data.shards import ShardManifest
    from data.tokenizer import load_tokenizer
    from model.io import find_tokenizer_dir, load_pretrained, resolve_checkpoint

    if args.batch_size < 1 or args.max_batches < 0:
        raise UserError("--batch-size must be at least 1 and --max-batches at least 0")
    data_dir = shard_dir(args.data, args.split)
    manifest = ShardManifest.load(data_dir)
    model_dir = resolve_checkpoint(args.checkpoint)
    model = load_pretrained(model_dir).eval()
    objective = objective_for(manifest.kind, model, manifest.extra.get("labels"), args.checkpoint)
    tokenizer_dir = find_tokenizer_dir(model_dir) or manifest.extra.get("tokenizer_path")
    if tokenizer_dir is None:
        raise UserError(f"no tokenizer.json beside {model_dir} and none named by {data_dir}/manifest.json")
    tokenizer = load_tokenizer(tokenizer_dir)
    seq_len = args.seq_len or training_seq_len(model_dir) or model.config.max_seq_len
    data = DataConfig(train=str(data_dir), valid=str(data_dir), seq_len=seq_len, num_workers=0, shuffle=False)
    loader = build_loader(data, objective=objective, tokenizer=tokenizer, rank=0, world_size=1,
                          micro_batch_size=args.batch_size, seed=args.seed, split="valid")
    batches = (b for i, b in enumerate(loader) if not args.max_batches or i < args.max_batches)
    with torch.no_grad():
        metrics = evaluate(model, objective, batches, tokenizer)
    result = {"checkpoint": str(model_dir), "data": str(data_dir), "kind": manifest.kind, "objective": objective,
              "seq_len": seq_len, **metrics}
    line = f"tessera eval: {manifest.kind} ({objective}) " + "  ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(line, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def shard_dir(data: Path, split: str) -> Path:
    """``data`` if it holds a manifest, else ``data/split``."""
    for candidate in (data, data / split):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise UserError(f"no shards at {data}: no manifest.json there or in {data / split} (make them with tessera shard)")


def training_seq_len(model_dir: Path) -> int | None:
    """data.seq_len of the run that wrote a checkpoint step's ``model/`` (its ``config.yaml``)."""
    import yaml

    config = model_dir.parent / "config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("seq_len")


def objective_for(kind: str, model: torch.nn.Module, labels: list[str] | None, where: Path) -> str:
    """The data objective that scores ``model`` on shards of ``kind``; a mismatch is a one-line error."""
    from model.transformer import Seq2SeqLM, SequenceClassifier

    seq2seq, classifier = isinstance(model, Seq2SeqLM), isinstance(model, SequenceClassifier)
    what = "a classifier" if classifier else f"an LM of arch {model.config.arch}"
    need = {"text": not classifier, "classification": classifier, "seq2seq": seq2seq,
            "preference": not classifier and not seq2seq and model.config.causal}
    if not need[kind]:
        wanted = {"text": "a language model", "classification": "a classifier (train.objective=classify)",
                  "seq2seq": "an encoder_decoder model", "preference": "a decoder LM"}[kind]
        raise UserError(f"{kind} shards need {wanted}; {where} holds {what}")
    if classifier and len(labels or []) != model.config.n_labels:
        raise UserError(f"{where} scores {model.config.n_labels} labels; the shards name {len(labels or [])}: {labels}")
    if kind != "text":
        return KIND_OBJECTIVES[kind]
    return "span" if seq2seq else "clm" if model.config.causal else "mlm"


def evaluate(model: torch.nn.Module, objective: str, batches: Any, tokenizer: Any) -> dict[str, Any]:
    """The metrics of ``objective`` over ``batches`` (sums over every unit, then means)."""
    if objective == "preference":
        return preference_metrics(model, batches)
    from trainer.objectives.classify import Classification
    from trainer.objectives.clm import CausalLM
    from trainer.objectives.mlm import MaskedLM
    from trainer.objectives.seq2seq import TeacherForcedSeq2Seq
    from trainer.objectives.span import SpanCorruption

    loss_of = {"clm": CausalLM("clm", 0), "mlm": MaskedLM(0), "span": SpanCorruption(0),
               "classify": Classification(), "seq2seq": TeacherForcedSeq2Seq(0)}[objective]
    loss = count = correct = rows = tokens_right = 0.0  # correct: right labels or exact matches
    labels: Counter[int] = Counter()
    for batch in batches:
        out = loss_of.loss(model, batch)
        loss, count = loss + float(out.loss_sum), count + float(out.count)
        correct += float(out.metrics.get("accuracy", 0.0))
        if objective == "classify":
            labels.update(batch["labels"].tolist())
        if objective == "seq2seq":
            correct += exact_matches(model, batch, tokenizer)
            tokens_right += teacher_forced_hits(model, batch)
            rows += batch["input_ids"].shape[0]
    if not count:
        raise UserError("the shards gave no batch to evaluate")
    mean = loss / count
    if objective == "classify":
        return {"accuracy": correct / count, "loss": mean, "samples": int(count),
                "majority_accuracy": max(labels.values()) / count}
    if objective == "seq2seq":
        return {"exact_match": correct / rows, "token_accuracy": tokens_right / count, "loss": mean,
                "ppl": math.exp(min(mean, 50.0)), "samples": int(rows), "tokens": int(count)}
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": int(count)}


def exact_matches(model: torch.nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> int:
    """Rows whose greedy decoding equals the target up to and including its EOS. Decoding stops after
    as many tokens as the longest target: anything longer is wrong anyway."""
    from model.generate import generate

    targets = [row[row != IGNORE_INDEX].tolist() for row in batch["labels"]]
    out = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"].bool(),
                   max_new_tokens=max(map(len, targets)), eos_token_ids=[tokenizer.eos_id],
                   pad_token_id=tokenizer.pad_id)
    return sum(out[b, 1 : 1 + len(t)].tolist() == t for b, t in enumerate(targets))


def teacher_forced_hits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Target tokens that are the decoder's argmax given the true previous tokens."""
    logits = model(batch["input_ids"], batch["decoder_input_ids"], attention_mask=batch["attention_mask"],
                   decoder_attention_mask=batch["decoder_attention_mask"])
    labels = batch["labels"]
    return int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())


def preference_metrics(model: torch.nn.Module, batches: Any) -> dict[str, Any]:
    """Share of pairs whose chosen continuation has the higher summed log-prob, and the mean margin."""
    from trainer.objectives.pairs import pair_logps

    wins = margin = pairs = 0.0
    for batch in batches:
        logps = pair_logps(model, batch)
        diff = logps.chosen - logps.rejected
        wins, margin, pairs = wins + float((diff > 0).sum()), margin + float(diff.sum()), pairs + len(diff)
    if not pairs:
        raise UserError("the shards gave no pair to evaluate")
    return {"logp_accuracy": wins / pairs, "logp_margin": margin / pairs, "pairs": int(pairs)}
