"""`make demo`: raw text to an aligned, exported model on the shipped corpora, on CPU, in minutes.

Every stage is a `tessera` command, printed before it runs so it can be copied:
prep → tokenizer → shards → pretrain → SFT → DPO → generate (before and after alignment) →
export → load with transformers → plots. Runs log to W&B in offline mode. ``--quick`` runs a few
steps per stage (what CI runs); the default is the full demo of the README.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from launch.recipes import RECIPES
from launch.stages import DATA, Stages

PRETRAIN_INPUTS = ["pretrain_tinystories_valid_head.txt", "pretrain_wikipedia_demo.txt", "pretrain_c4_demo.jsonl"]
SFT_INPUTS = ["sft_alpaca_en_demo.json", "sft_rasbt_instruction_data.json"]
PREFERENCE_INPUT = "pref_rasbt_instruction_data_with_preference.json"
PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.",
           "Rewrite the sentence in passive voice: The cat chased the mouse."]

MODEL = ["model.preset=tiny-llama", "model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=352", "model.max_seq_len=256"]
# (steps, micro batch, lr) per stage: the full demo, and --quick for CI
STEPS = {"full": {"pretrain": (500, 16, 3e-3), "sft": (200, 16, 1e-3), "align": (60, 8, 2e-4)},
         "quick": {"pretrain": (12, 8, 3e-3), "sft": (6, 8, 1e-3), "align": (4, 4, 5e-4)}}


class Demo(Stages):
    """The chat pipeline: prep → tokenizer → shards → pretrain → SFT → DPO → generate → export."""

    def train(self, task: str, run: str, data: Path, *extra: str) -> Path:
        steps, micro, lr = STEPS[self.mode][task]
        run_dir = self.out / run
        self.tessera(
            task, *MODEL, f"data.train={data / 'train'}", f"data.valid={data / 'valid'}", "data.seq_len=256",
            "data.num_workers=1", f"train.max_steps={steps}", f"train.micro_batch_size={micro}", f"train.lr={lr:g}",
            f"train.min_lr={lr / 10:g}", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.eval_every={max(1, steps // 4)}", "train.eval_steps=8", f"log.dir={run_dir}", "log.wandb=true",
            f"log.wandb_run_name=demo-{run}", "log.wandb_group=demo", "checkpoint.keep_last=1", *extra,
        )
        self.tessera("plot", str(run_dir))
        return run_dir

    def run(self) -> None:
        out = self.out
        self.stage("1/9 prepare: normalise, quality-filter and deduplicate the raw text")
        self.tessera("prep", *(str(DATA / f) for f in PRETRAIN_INPUTS), "--out", str(out / "prep"))
        report = json.loads((out / "prep" / "report.json").read_text())
        self.summary["documents kept"] = f"{report['documents_out']} of {report['documents_in']}"

        self.stage("2/9 split off held-out documents, pairs and conversations")
        text = split_records(out / "prep" / "documents.jsonl", out / "split" / "text")
        sft = split_records([DATA / f for f in SFT_INPUTS], out / "split" / "sft")
        pairs = split_records(DATA / PREFERENCE_INPUT, out / "split" / "pairs")

        self.stage("3/9 train a byte-level BPE tokenizer")
        tokenizer = out / "tokenizer"
        self.tessera("tokenizer", "train", str(text / "train.jsonl"), "--vocab-size", "4096", "--out", str(tokenizer))

        self.stage("4/9 tokenize into webdataset shards")
        shards = out / "shards"
        for name, split_dir, kind in (("text", text, "text"), ("sft", sft, "sft"), ("pairs", pairs, "preference")):
            for split in ("train", "valid"):
                extra = ["--append-eos"] if kind == "text" else ["--max-len", "256", "--skip-bad"]
                self.tessera("shard", str(split_dir / f"{split}.jsonl"), "--tokenizer", str(tokenizer),
                             "--out", str(shards / name / split), "--kind", kind, *extra)

        self.stage("5/9 pretrain a small decoder (causal LM)")
        pretrain = self.train("pretrain", "pretrain", shards / "text")
        self.stage("6/9 instruction-tune it (SFT: loss on assistant turns only)")
        sft_run = self.train("sft", "sft", shards / "sft", f"model.init={pretrain / 'checkpoints'}")
        self.stage("7/9 align it on preference pairs (DPO)")
        dpo = self.train("align", "dpo", shards / "pairs", f"model.init={sft_run / 'checkpoints'}",
                         "align.loss=dpo", "align.beta=0.1", "align.reference=precomputed")

        self.stage("8/9 answer a few prompts: before and after alignment")
        prompts = [a for p in PROMPTS for a in ("--prompt", p)]
        for label, run_dir in (("SFT", sft_run), ("SFT + DPO", dpo)):
            print(f"\n--- {label}")
            self.tessera("generate", "--checkpoint", str(run_dir / "checkpoints"), "--chat", *prompts,
                         "--max-new-tokens", "40")

        self.stage("9/9 export to the Hugging Face layout and generate with transformers")
        exported = out / "export"
        self.tessera("export", "--checkpoint", str(dpo / "checkpoints"), "--out", str(exported))
        print(f"transformers: {generate_with_transformers(exported, PROMPTS[0])}")

        self.summary.update(metrics_summary(pretrain, sft_run, dpo))
        self.finish([pretrain, sft_run, dpo], exported)


def split_records(inputs: Path | list[Path], out: Path, every: int = 20) -> Path:
    """Write every ``every``-th record to valid.jsonl and the rest to train.jsonl."""
    from data.readers import iter_records

    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "valid": 0}
    paths = inputs if isinstance(inputs, list) else [inputs]
    with open(out / "train.jsonl", "w") as train, open(out / "valid.jsonl", "w") as valid:
        for index, (_, record) in enumerate(iter_records(paths)):
            split = "valid" if index % every == every - 1 else "train"
            (valid if split == "valid" else train).write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[split] += 1
    print(f"{out.name}: {counts['train']} train, {counts['valid']} held out → {out}")
    return out


def metrics_summary(pretrain: Path, sft: Path, dpo: Path) -> dict[str, str]:
    def rows(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def first_last(run: Path, key: str) -> str:
        points = [(r["step"], r[key]) for r in rows(run) if key in r]
        if not points:
            return "-"
        (s0, v0), (s1, v1) = points[0], points[-1]
        return f"{v0:.3f} (step {s0}) → {v1:.3f} (step {s1})"

    def perplexity(run: Path) -> str:
        losses = [r["eval/loss"] for r in rows(run) if "eval/loss" in r]
        return f"{math.exp(losses[-1]):.1f}" if losses else "-"

    return {
        "pretrain valid loss": first_last(pretrain, "eval/loss"),
        "pretrain held-out perplexity": perplexity(pretrain),
        "SFT valid loss": first_last(sft, "eval/loss"),
        "DPO valid loss": first_last(dpo, "eval/loss"),
        "DPO valid reward accuracy": first_last(dpo, "eval/rewards/accuracies"),
        "DPO train reward margin": first_last(dpo, "rewards/margins"),
    }


def generate_with_transformers(model_dir: Path, prompt: str) -> str:
    """Load the export with transformers alone and answer one chat prompt greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False, eos_token_id=[tokenizer.eos_token_id, end],
                         pad_token_id=tokenizer.pad_token_id)
    return prompt + " → " + tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"),
                        help="where every stage writes (default runs/demo-DATE-TIME)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (CI's smoke test)")
    parser.add_argument("--recipe", choices=("chat", "encoder", "seq2seq"), default="chat",
                        help="chat: the decoder pipeline (default); encoder: MLM → SMS spam classifier; "
                             "seq2seq: span corruption → SCAN (launch/recipes.py)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"demo: {args.out} is not empty; remove it or pass --out DIR")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    if args.recipe == "chat":
        Demo(args.out, args.quick).run()
    else:
        RECIPES[args.recipe](args.out, args.quick).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
