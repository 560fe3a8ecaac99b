"""LoRA against full fine-tuning on the shipped instruction data (CPU): held-out loss at the same steps,
trainable share, optimizer-state bytes and peak host RSS.

    PYTHONPATH=. python bench/lora_vs_full.py --out runs/lora-bench [--steps 150] [--memory-d-model 512]

Builds a byte-level BPE on TinyStories + the instructions, pretrains a small Llama briefly on the
stories and the training instructions as plain text (the base), then SFTs it on rasbt's instructions
(1,000 train / 100 held out) for the same steps: every weight (AdamW), LoRA, and QLoRA (NF4 base).
Each run is its own subprocess, so its peak RSS (``ru_maxrss``) is its own; "live RSS" is taken at
the end after ``malloc_trim`` (glibc otherwise keeps freed memory, which hides the difference).
``--memory-d-model`` adds short runs on a wider model (random base), where the optimizer state is
large enough to show in RSS. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parents[1] / "examples" / "data"
MODEL = {"preset": "tiny-llama", "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 344,
         "max_seq_len": 128}


def prepare(out: Path) -> dict[str, Path]:
    from data.make_shards import make_shards
    from data.tokenizer import train_tokenizer

    stories = [b for b in (DATA / "pretrain_tinystories_valid_head.txt").read_text().split("\n\n") if b.strip()]
    instructions = json.loads((DATA / "sft_rasbt_instruction_data.json").read_text())
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        texts = stories + [f"{r['instruction']} {r['input']} {r['output']}" for r in instructions]
        train_tokenizer(texts, out / "tokenizer", vocab_size=1024)
    paths = {"tokenizer": out / "tokenizer"}
    # the base also reads the training instructions as plain text: LoRA leaves the embeddings frozen, so
    # tokens the base never saw would keep their random embeddings (a handicap full fine-tuning lacks)
    plain = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in instructions[:1000]]
    splits = {"text": (stories[:600] + plain, stories[600:]), "sft": (instructions[:1000], instructions[1000:])}
    for name, (train, valid) in splits.items():
        for split, items in (("train", train), ("valid", valid)):
            target = out / f"{name}_{split}"
            if not (target / "manifest.json").is_file():
                source = out / f"{name}_{split}.{'txt' if name == 'text' else 'json'}"
                source.write_text("\n\n".join(items) + "\n" if name == "text" else json.dumps(items))
                make_shards([str(source)], out / "tokenizer", target, kind=name, append_eos=True,
                            shard_bytes=64 << 10)
            paths[f"{name}_{split}"] = target
    return paths


def run_config(run_dir: Path, train: Path, valid: Path, steps: int, lr: float, model: dict, lora: dict) -> dict:
    return {
        "model": model,
        "data": {"train": str(train), "valid": str(valid), "seq_len": 96, "num_workers": 0},
        "train": {"micro_batch_size": 16, "max_steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": 10,
                  "seed": 0, "weight_decay": 0.0, "eval_every": steps, "eval_steps": 100},
        "checkpoint": {"keep_last": 1},
        "log": {"dir": str(run_dir), "progress": False},
        "lora": lora,
    }


def child(raw: dict, task: str) -> dict:
    """One run in this process: its results, trainable share, optimizer-state bytes and peak RSS."""
    import ctypes
    import resource

    import torch

    from trainer.callbacks import Callback
    from trainer.config import RunConfig
    from trainer.run import run

    class Measure(Callback):
        def on_train_end(self, trainer) -> None:
            model, optimizer = trainer.strategy.model, trainer.strategy.optimizer
            self.params = sum(p.numel() for p in model.parameters())
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                   for t in s.values() if torch.is_tensor(t) and t.dim())
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # what is live, not what glibc keeps of freed memory
            self.rss_end = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    measure = Measure()
    result = run(RunConfig.from_dict(raw), task, [measure])
    return {"eval_loss": result.eval_loss, "final_train_loss": result.final_loss, "steps": result.steps,
            "params": measure.params, "trainable": measure.trainable, "optimizer_state_bytes": measure.state_bytes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "live_rss_mib": measure.rss_end,
            "checkpoint": str(result.checkpoint)}


def in_subprocess(raw: dict, task: str) -> dict:
    code = ("import json, sys; from bench.lora_vs_full import child; "
            "print('RESULT ' + json.dumps(child(json.loads(sys.argv[1]), sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(raw), task], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--full-lr", type=float, default=2e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--memory-d-model", type=int, default=0, help="also: 3-step runs on a wider random model")
    args = parser.parse_args()
    paths = prepare(args.out)
    lora = {"rank": args.rank, "alpha": 2 * args.rank, "targets": args.targets.split(",")}
    qlora = {**lora, "quantize": "nf4"}  # needs torchao
    base = in_subprocess(run_config(args.out / "base", paths["text_train"], paths["text_valid"], args.pretrain_steps,
                                    3e-3, MODEL, {}), "pretrain")
    init = {"init": base["checkpoint"]}
    rows = {"full": in_subprocess(run_config(args.out / "full", paths["sft_train"], paths["sft_valid"], args.steps,
                                             args.full_lr, init, {}), "sft"),
            "lora": in_subprocess(run_config(args.out / "lora", paths["sft_train"], paths["sft_valid"], args.steps,
                                             args.lora_lr, init, lora), "sft"),
            "qlora": in_subprocess(run_config(args.out / "qlora", paths["sft_train"], paths["sft_valid"], args.steps,
                                              args.lora_lr, init, qlora), "sft")}
    if args.memory_d_model:
        from model import ModelConfig, build_model, save_pretrained

        wide = {**MODEL, "d_model": args.memory_d_model, "d_ff": int(args.memory_d_model * 8 / 3) // 8 * 8,
                "n_heads": 8, "n_kv_heads": 4, "n_layers": 8, "vocab_size": 1024}
        save_pretrained(build_model(ModelConfig.from_dict(wide)), args.out / "wide_base")
        wide_init = {"init": str(args.out / "wide_base")}
        for name, cfg, lr in (("wide full", {}, args.full_lr), ("wide lora", lora, args.lora_lr),
                              ("wide qlora", qlora, args.lora_lr)):
            raw = run_config(args.out / name.replace(" ", "_"), paths["sft_train"], paths["sft_valid"], 3, lr,
                             wide_init, cfg)
            raw["train"].update(eval_every=0, warmup_steps=1)
            rows[name] = in_subprocess(raw, "sft")
    print(f"base: pretrained {args.pretrain_steps} steps, held-out text loss {base['eval_loss']:.4f}")
    print(f"SFT {args.steps} steps, lora rank {args.rank} on {args.targets}")
    print("| run | params | trainable | share | optimizer state | held-out loss | peak RSS | live RSS at end |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        held = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        print(f"| {name} | {row['params']:,} | {row['trainable']:,} | {100 * row['trainable'] / row['params']:.2f}% "
              f"| {row['optimizer_state_bytes'] / 2**20:.2f} MiB | {held} | {row['peak_rss_mib']:.0f} MiB "
              f"| {row['live_rss_mib']:.0f} MiB |")
    (args.out / "results.json").write_text(json.dumps({"base": base, **rows}, indent=1))


if __name__ == "__main__":
    main()
