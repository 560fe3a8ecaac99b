"""Alignment quality: DPO by ``tessera align`` against TRL's ``DPOTrainer``, same start, pairs and budget.

The pairs are rasbt's instruction pairs (polite chosen, impolite rejected; every 10th held out). The
pipeline runs once: ``tessera tokenizer train`` on the training pairs' text, ``tessera shard --kind
preference``, and a short ``tessera pretrain`` on the training pairs' text (prompt + chosen and prompt
+ rejected as documents) whose ``tessera export`` is the start model and the reference of both sides.
Then per seed, the same steps, batch and optimiser settings:

- **tessera**: ``tessera align align.loss=dpo`` from the start checkpoint, then ``tessera export``;
- **trl**: ``trl.DPOTrainer`` (sigmoid loss, reference log-probs precomputed) from the exported start
  model, on the same conversations (Tessera's reading of the records), which it tokenizes itself with the
  same chat template into the same tokens.

Both policies are loaded with ``AutoModelForCausalLM`` and scored by the same code on the held-out
pairs' tokens (Tessera's shards): reward accuracy (the DPO implicit reward β·(log π/π_ref) is higher
for the chosen answer; ties count half), held-out DPO loss, and log-prob accuracy (the policy gives the
chosen answer more log-probability outright).

    PYTHONPATH=. python bench/alignment_quality.py [--seeds 0,1,2] [--json F]
    PYTHONPATH=. python bench/alignment_quality.py --smoke      # fewer pairs and steps, one seed (CI)
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.learning_quality import DATA, mean_sd, read_fields, seeded_main, tessera

PAIRS = "pref_rasbt_instruction_data_with_preference.json"
HELD_OUT_EVERY = 10


@dataclasses.dataclass(frozen=True)
class Budget:
    steps: int
    warmup: int
    pretrain_steps: int
    pairs: int | None  # None: all
    vocab: int = 2048
    seq_len: int = 128  # prompt + response tokens per sequence
    micro_batch: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    beta: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    model: tuple[str, ...] = ("model.preset=tiny-llama", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                              "model.n_kv_heads=2", "model.d_ff=176")

    def common(self, steps: int, warmup: int, seed: int) -> list[str]:
        return [*self.model, f"model.max_seq_len={self.seq_len + 1}", f"data.seq_len={self.seq_len}",
                "data.num_workers=0", f"train.micro_batch_size={self.micro_batch}", f"train.max_steps={steps}",
                f"train.warmup_steps={warmup}", f"train.weight_decay={self.weight_decay}",
                f"train.betas=[{self.betas[0]},{self.betas[1]}]", f"train.grad_clip={self.clip}", f"train.seed={seed}",
                "train.eval_every=0", "log.progress=false", "checkpoint.keep_last=1"]


FULL = Budget(steps=60, warmup=6, pretrain_steps=100, pairs=None)
SMOKE = Budget(steps=30, warmup=3, pretrain_steps=40, pairs=400)


@dataclasses.dataclass
class Prepared:
    tokenizer: Path
    shards: Path
    train_records: list[dict]
    start: Path  # Tessera checkpoint of the start model
    start_hf: Path  # its export: the TRL side's start and both sides' reference
    valid: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # held-out (prompt, chosen, rejected) tokens


def prepare(work: Path, budget: Budget) -> Prepared:
    records = json.loads((DATA / PAIRS).read_text(encoding="utf-8"))[: budget.pairs]
    split = {"train": [r for i, r in enumerate(records) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1],
             "valid": [r for i, r in enumerate(records) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]}
    work.mkdir(parents=True, exist_ok=True)
    text = work / "text.jsonl"
    with text.open("w", encoding="utf-8") as f:
        for r in split["train"]:
            prompt = f"{r['instruction']}\n\n{r['input']}".strip()
            for answer in (r["chosen"], r["rejected"]):
                f.write(json.dumps({"text": f"{prompt}\n\n{answer}"}, ensure_ascii=False) + "\n")
    tokenizer = work / "tokenizer"
    tessera("tokenizer", "train", str(text), "--vocab-size", str(budget.vocab), "--out", str(tokenizer))
    tessera("shard", str(text), "--tokenizer", str(tokenizer), "--out", str(work / "shards" / "text"),
            "--append-eos", "--workers", "1")
    for part, items in split.items():
        (work / f"pairs_{part}.json").write_text(json.dumps(items, ensure_ascii=False))
        tessera("shard", str(work / f"pairs_{part}.json"), "--tokenizer", str(tokenizer), "--kind", "preference",
                "--out", str(work / "shards" / part), "--max-len", str(budget.seq_len), "--skip-bad",
                "--workers", "1")
    start, start_hf = start_model(work, budget, work / "shards" / "text")
    valid = list(zip(*read_fields(work / "shards" / "valid")))
    return Prepared(tokenizer, work / "shards", split["train"], start, start_hf, valid)


def start_model(work: Path, budget: Budget, text_shards: Path) -> tuple[Path, Path]:
    """A short ``tessera pretrain`` on ``text_shards`` (seed 0), exported: (its checkpoints, its HF directory)."""
    run = work / "start"
    tessera("pretrain", *budget.common(budget.pretrain_steps, max(1, budget.pretrain_steps // 10), 0),
            f"data.train={text_shards}", "train.lr=3e-3", "train.min_lr=3e-4", f"log.dir={run}")
    tessera("export", "--checkpoint", str(run / "checkpoints"), "--out", str(work / "start_hf"))
    return run / "checkpoints", work / "start_hf"


def train_tessera(data: Prepared, budget: Budget, seed: int, out: Path) -> Path:
    run = out / "run"
    tessera("align", *budget.common(budget.steps, budget.warmup, seed), f"model.init={data.start}",
            f"data.train={data.shards / 'train'}", f"train.lr={budget.lr}", f"train.min_lr={budget.min_lr}",
            "align.loss=dpo", f"align.beta={budget.beta}", "align.reference=precomputed", f"log.dir={run}")
    tessera("export", "--checkpoint", str(run / "checkpoints"), "--out", str(out / "hf"))
    return out / "hf"


def train_trl(data: Prepared, budget: Budget, seed: int, out: Path) -> Path:
    """TRL's DPOTrainer on the same conversations (Tessera's own reading of the records)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from data.conversations import to_preference

    rows = []
    for record in data.train_records:
        prompt, chosen, rejected = to_preference(record)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    args = DPOConfig(
        output_dir=str(out / "trl"), max_steps=budget.steps, per_device_train_batch_size=budget.micro_batch,
        learning_rate=budget.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": budget.min_lr},
        warmup_steps=budget.warmup, weight_decay=budget.weight_decay, adam_beta1=budget.betas[0],
        adam_beta2=budget.betas[1], max_grad_norm=budget.clip, beta=budget.beta, max_length=budget.seq_len + 1,
        seed=seed, data_seed=seed, use_cpu=True, report_to="none", save_strategy="no", logging_steps=budget.steps,
        dataloader_num_workers=0, disable_tqdm=True, precompute_ref_log_probs=True,
    )
    model = AutoModelForCausalLM.from_pretrained(data.start_hf)
    datasets.disable_progress_bars()
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(data.start_hf))
    trainer.remove_callback(PrinterCallback)  # its per-step dicts; the bench prints its own rows
    trainer.train()
    trainer.save_model(str(out / "hf"))
    return out / "hf"


@torch.no_grad()
def response_logps(model, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int) -> np.ndarray:
    """[pairs, 2]: summed log-probs of the chosen and rejected responses given the prompt, cut to
    ``seq_len + 1`` tokens as the preference collator cuts them."""
    budget = seq_len + 1
    out = np.zeros((len(pairs), 2))
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        keep = min(len(prompt), max(budget // 2, budget - max(len(chosen), len(rejected))))
        prompt = prompt[len(prompt) - keep :]
        for j, response in enumerate((chosen, rejected)):
            ids = torch.from_numpy(np.concatenate([prompt, response[: budget - keep]]))
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
            picked = logp[torch.arange(len(ids) - 1), ids[1:]]
            out[i, j] = float(picked[len(prompt) - 1 :].sum())
    return out


def preference_scores(policy_dir: Path, reference: np.ndarray, data: Prepared, budget: Budget) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    policy = response_logps(AutoModelForCausalLM.from_pretrained(policy_dir).eval(), data.valid, budget.seq_len)
    margin = budget.beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return {"reward_accuracy": float((margin > 0).mean() + 0.5 * (margin == 0).mean()),
            "dpo_loss": float(np.mean(np.logaddexp(0.0, -margin))),
            "logp_accuracy": float((policy[:, 0] > policy[:, 1]).mean())}


def main(argv: list[str] | None = None) -> int:
    return seeded_main(argv, "bench/alignment_quality.py", __doc__,
                       f"the first {SMOKE.pairs} pairs, seed 0, {SMOKE.steps} DPO steps",
                       run, SMOKE, FULL)


METRICS = ("reward_accuracy", "dpo_loss", "logp_accuracy")


def run(seeds: list[int], budget: Budget, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    started = time.time()
    data = prepare(work, budget)
    reference = response_logps(AutoModelForCausalLM.from_pretrained(data.start_hf).eval(), data.valid, budget.seq_len)
    start = preference_scores(data.start_hf, reference, data, budget)
    rows = []
    for seed in seeds:
        out = work / f"seed{seed}"
        t0 = time.time()
        mine = preference_scores(train_tessera(data, budget, seed, out / "tessera"), reference, data, budget)
        t1 = time.time()
        peer = preference_scores(train_trl(data, budget, seed, out / "trl"), reference, data, budget)
        rows.append({"seed": seed, **{f"tessera_{k}": v for k, v in mine.items()},
                     **{f"trl_{k}": v for k, v in peer.items()}, "tessera_train_s": round(t1 - t0, 1),
                     "trl_train_s": round(time.time() - t1, 1)})
        print(f"dpo seed {seed}: " + ", ".join(f"{k} tessera {mine[k]:.3f} / trl {peer[k]:.3f}" for k in METRICS),
              flush=True)
    summary = {side: {k: mean_sd([r[f"{side}_{k}"] for r in rows]) for k in METRICS} for side in ("tessera", "trl")}
    lines = ["| metric (held-out pairs) | start | tessera align | TRL DPOTrainer |", "|---|---:|---:|---:|"]
    for k in METRICS:
        (tm, ts), (pm, ps) = summary["tessera"][k], summary["trl"][k]
        lines.append(f"| {k} | {start[k]:.3f} | {tm:.3f} ± {ts:.3f} | {pm:.3f} ± {ps:.3f} |")
    return {"budget": dataclasses.asdict(budget), "train_pairs": len(data.train_records),
            "valid_pairs": len(data.valid),
            "start": start, "rows": rows, "summary": summary, "table": "\n".join(lines),
            "seconds": round(time.time() - started, 1), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "isfinite": all(
                math.isfinite(r[f"{s}_dpo_loss"]) for r in rows for s in ("tessera", "trl"))}


if __name__ == "__main__":
    sys.exit(main())
