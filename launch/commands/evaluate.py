"""`tessera eval --checkpoint DIR --data DIR`: score a model on a shard directory, by the shards' kind;
`tessera eval --checkpoint DIR --tasks FILE.jsonl`: multiple-choice accuracy, as lm-evaluation-harness
scores it (acc and acc_norm, see :func:`trainer.evaluation.score_choices`);
`tessera eval --checkpoint DIR --lm-eval TASK[,TASK] [--include-path DIR]`: lm-evaluation-harness itself
on the checkpoint exported to the Hugging Face layout.

text            the pretraining loss and perplexity: causal LM (decoder), masked LM (encoder, seeded
                15% masking) or span corruption (encoder-decoder, seeded noise)
classification  accuracy and cross-entropy (and the majority-class accuracy, the trivial baseline)
seq2seq         exact match of greedy decoding against the target; teacher-forced token loss and
                token accuracy (the argmax given the true previous tokens)
preference      log-prob accuracy (the chosen answer more likely than the rejected one) and the mean
                log-prob margin; DPO's implicit-reward accuracy would need the reference model too
sft             the loss and perplexity on assistant tokens

A ``--tasks`` record is a JSON object with a context (``context``, ``query`` or ``ctx``), its
choices (``choices`` or ``endings``) and the right one's index (``label`` or ``gold``, an int or a
digit string): HellaSwag's own records and lm-evaluation-harness's processed ones both read as they are.

One line goes to stdout (stderr when the JSON does), the JSON to stdout (``--json``) or a file.
The objective, the loop and the metrics live in :mod:`trainer.evaluation`; this is the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a model directory, a checkpoints/ directory (its latest), or a Hugging Face directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", type=Path,
                      help="a shard directory (tessera shard), or one holding a sub-directory per split")
    what.add_argument("--tasks", type=Path, metavar="FILE.jsonl",
                      help="multiple-choice records ({context|query|ctx, choices|endings, label|gold}): "
                           "acc and acc_norm by the log-likelihood of each choice")
    what.add_argument("--lm-eval", metavar="TASK[,TASK...]",
                      help="run lm-evaluation-harness (pip install lm_eval) on the checkpoint exported to the "
                           "Hugging Face layout: its tasks, or your task YAMLs under --include-path")
    parser.add_argument("--include-path", type=Path, default=None, metavar="DIR",
                        help="--lm-eval: a directory of lm-eval task YAMLs (e.g. over local jsonl files)")
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
    from trainer.evaluation import score, shard_objective

    if args.batch_size < 1 or args.max_batches < 0:
        raise UserError("--batch-size must be at least 1 and --max-batches at least 0")
    if args.tasks is not None:
        return run_tasks(args)
    if args.lm_eval is not None:
        return run_harness(args)
    data_dir = shard_dir(args.data, args.split)
    manifest = ShardManifest.load(data_dir)
    model_dir = resolve_checkpoint(args.checkpoint)
    model = load_pretrained(model_dir).eval()
    objective = shard_objective(manifest.kind, model, manifest.extra.get("labels"), args.checkpoint)
    tokenizer_dir = find_tokenizer_dir(model_dir) or manifest.extra.get("tokenizer_path")
    if tokenizer_dir is None:
        raise UserError(f"no tokenizer.json beside {model_dir} and none named by {data_dir}/manifest.json")
    tokenizer = load_tokenizer(tokenizer_dir)
    seq_len = args.seq_len or training_seq_len(model_dir) or model.config.max_seq_len
    data = DataConfig(train=str(data_dir), valid=str(data_dir), seq_len=seq_len, num_workers=0, shuffle=False)
    loader = build_loader(data, objective=str(objective), tokenizer=tokenizer, rank=0, world_size=1,
                          micro_batch_size=args.batch_size, seed=args.seed, split="valid")
    metrics = score(model, objective, loader, tokenizer, max_batches=args.max_batches or None)
    result = {"checkpoint": str(model_dir), "data": str(data_dir), "kind": manifest.kind, "objective": str(objective),
              "seq_len": seq_len, **metrics}
    report(args, f"{manifest.kind} ({objective})", metrics, result)
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """``--tasks FILE``: acc and acc_norm of the checkpoint's decoder on the file's records."""
    from data.tasks import read_multiple_choice
    from data.tokenizer import load_tokenizer
    from model.io import find_tokenizer_dir, load_pretrained, resolve_checkpoint
    from trainer.evaluation import score_choices

    items = read_multiple_choice(args.tasks)
    model_dir = resolve_checkpoint(args.checkpoint)
    tokenizer_dir = find_tokenizer_dir(model_dir)
    if tokenizer_dir is None:
        raise UserError(f"no tokenizer.json beside {model_dir}: multiple-choice tasks are text")
    model = load_pretrained(model_dir).eval()
    metrics = score_choices(model, load_tokenizer(tokenizer_dir), items, batch_size=args.batch_size,
                            where=args.checkpoint)
    result = {"checkpoint": str(model_dir), "tasks": str(args.tasks), **metrics}
    report(args, f"{args.tasks.name} (multiple choice)", metrics, result)
    return 0


def run_harness(args: argparse.Namespace) -> int:
    """``--lm-eval TASKS``: the checkpoint exported to a temporary Hugging Face directory (a LoRA
    adapter merged in), scored there by lm-evaluation-harness."""
    import tempfile

    from launch.commands.export import export_model
    from model.io import find_tokenizer_dir, load_pretrained, resolve_checkpoint
    from trainer.evaluation import harness

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not tasks:
        raise UserError("--lm-eval needs at least one task name")
    if args.include_path is not None and not args.include_path.is_dir():
        raise UserError(f"--include-path {args.include_path} is not a directory")
    model_dir = resolve_checkpoint(args.checkpoint)
    if find_tokenizer_dir(model_dir) is None:
        raise UserError(f"no tokenizer.json beside {model_dir}: lm-eval's tasks are text")
    model = load_pretrained(model_dir).eval()
    with tempfile.TemporaryDirectory(prefix="tessera-lm-eval-") as tmp:
        export_model(model, find_tokenizer_dir(model_dir), Path(tmp), merge=model.lora_config is not None)
        results = harness(tmp, tasks, include_path=args.include_path, batch_size=args.batch_size)
    metrics = {f"{task}/{name}": value for task, values in results.items() for name, value in values.items()}
    report(args, "lm-eval", metrics, {"checkpoint": str(model_dir), "lm_eval": results})
    return 0


def report(args: argparse.Namespace, what: str, metrics: dict, result: dict) -> None:
    """One line to stdout (stderr when the JSON goes there), the JSON to stdout or ``--json FILE``."""
    line = f"tessera eval: {what} " + "  ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(line, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


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
