"""SFT quality: ``tessera sft`` against TRL's ``SFTTrainer`` (completion-only loss), same start, data and budget.

The conversations are rasbt's instruction records (every 10th held out). The pipeline runs once:
``tessera tokenizer train`` on the training records' text, ``tessera shard --kind sft`` (the loss mask on
assistant tokens, the end-of-turn token included), and a short ``tessera pretrain`` on the training
records' text whose ``tessera export`` is both sides' start. Then per seed, the same steps, batch,
schedule and optimiser settings, one conversation per row (no packing), cut to ``seq_len + 1`` tokens:

- **tessera**: ``tessera sft`` from the start checkpoint, then ``tessera export``;
- **trl**: ``trl.SFTTrainer`` from the exported start, on the same conversations (Tessera's reading of the
  records) as prompt/completion messages, which it renders with the same chat template and tokenizes itself;
  ``completion_only_loss`` puts the loss on the assistant turn. The report counts the training records on
  which TRL's ``input_ids``/``labels`` equal Tessera's shards (cut alike): they must all.

Both models are loaded with ``AutoModelForCausalLM`` and scored by the same code on the held-out
conversations (Tessera's shards): the mean NLL of the assistant tokens (and its exp).

    PYTHONPATH=. python bench/sft_quality.py [--seeds 0,1,2] [--json F]
    PYTHONPATH=. python bench/sft_quality.py --smoke      # fewer records and steps, one seed (CI)
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

from bench.alignment_quality import Budget, start_model
from bench.learning_quality import DATA, mean_sd, read_fields, seeded_main, tessera

RECORDS = "sft_rasbt_instruction_data.json"
HELD_OUT_EVERY = 10
MAX_RECORD_LEN = 4096  # shards keep whole conversations; both sides cut them to seq_len + 1 when batching
SHAPE = ("model.preset=tiny-llama", "model.d_model=128", "model.n_layers=4", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=352")
# `pairs` counts records here; `beta` is unused
FULL = Budget(steps=100, warmup=10, pretrain_steps=150, pairs=None, seq_len=256, micro_batch=16, lr=2e-3,
              min_lr=2e-4, model=SHAPE)
SMOKE = Budget(steps=12, warmup=2, pretrain_steps=20, pairs=120, vocab=512, seq_len=96, micro_batch=8, lr=2e-3,
               min_lr=2e-4)


@dataclasses.dataclass
class Prepared:
    shards: Path
    train_records: list[dict]
    train: list[tuple[np.ndarray, np.ndarray]]  # Tessera's (ids, loss mask) per training record
    valid: list[tuple[np.ndarray, np.ndarray]]
    start: Path
    start_hf: Path


def prepare(work: Path, budget: Budget) -> Prepared:
    records = json.loads((DATA / RECORDS).read_text(encoding="utf-8"))[: budget.pairs]
    split = {"train": [r for i, r in enumerate(records) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1],
             "valid": [r for i, r in enumerate(records) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]}
    work.mkdir(parents=True, exist_ok=True)
    text = work / "text.jsonl"
    text.write_text("".join(json.dumps({"text": "\n\n".join(r[k] for k in ("instruction", "input", "output") if r[k])},
                                       ensure_ascii=False) + "\n" for r in split["train"]), encoding="utf-8")
    tokenizer = work / "tokenizer"
    tessera("tokenizer", "train", str(text), "--vocab-size", str(budget.vocab), "--out", str(tokenizer))
    tessera("shard", str(text), "--tokenizer", str(tokenizer), "--out", str(work / "shards" / "text"),
            "--append-eos", "--workers", "1")
    conversations = {}
    for part, items in split.items():
        (work / f"sft_{part}.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
        tessera("shard", str(work / f"sft_{part}.json"), "--tokenizer", str(tokenizer), "--kind", "sft",
                "--out", str(work / "shards" / part), "--max-len", str(MAX_RECORD_LEN), "--workers", "1")
        conversations[part] = list(zip(*read_fields(work / "shards" / part)))
        if len(conversations[part]) != len(items):  # no --skip-bad: a record TRL reads is a record Tessera trains on
            raise SystemExit(f"sft_quality: {part}: {len(items)} records but {len(conversations[part])} samples")
    start, start_hf = start_model(work, budget, work / "shards" / "text")
    return Prepared(work / "shards", split["train"], conversations["train"], conversations["valid"], start, start_hf)


def train_tessera(data: Prepared, budget: Budget, seed: int, out: Path) -> Path:
    run = out / "run"
    tessera("sft", *budget.common(budget.steps, budget.warmup, seed), f"model.init={data.start}",
            f"data.train={data.shards / 'train'}", "data.packing=false", f"train.lr={budget.lr}",
            f"train.min_lr={budget.min_lr}", f"log.dir={run}")
    tessera("export", "--checkpoint", str(run / "checkpoints"), "--out", str(out / "hf"))
    return out / "hf"


def trl_rows(records: list[dict]) -> list[dict]:
    """Tessera's reading of each record as TRL's conversational prompt/completion: the last assistant
    turn is the completion, everything before it the prompt."""
    from data.conversations import to_messages

    rows = []
    for record in records:
        messages = to_messages(record)
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def trl_trainer(data: Prepared, budget: Budget, seed: int, out: Path):
    """TRL's SFTTrainer as a user sets it up for completion-only SFT, with Tessera's hyper-parameters."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out / "trl"), max_steps=budget.steps, per_device_train_batch_size=budget.micro_batch,
        learning_rate=budget.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": budget.min_lr},
        warmup_steps=budget.warmup, weight_decay=budget.weight_decay, adam_beta1=budget.betas[0],
        adam_beta2=budget.betas[1], max_grad_norm=budget.clip, max_length=budget.seq_len + 1,
        completion_only_loss=True, packing=False, seed=seed, data_seed=seed, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=budget.steps,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    datasets.disable_progress_bars()
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(data.start_hf), args=args,
                         train_dataset=datasets.Dataset.from_list(trl_rows(data.train_records)),
                         processing_class=AutoTokenizer.from_pretrained(data.start_hf))
    trainer.remove_callback(PrinterCallback)  # its per-step dicts; the bench prints its own rows
    return trainer


def same_tokens(trainer, data: Prepared, budget: Budget) -> int:
    """How many training records TRL tokenized into exactly Tessera's tokens and labels (cut to seq_len + 1)."""
    keep = budget.seq_len + 1
    same = 0
    for row, (ids, mask) in zip(trainer.train_dataset, data.train, strict=True):
        labels = np.where(mask[:keep] > 0, ids[:keep], -100)
        same += row["input_ids"] == ids[:keep].tolist() and row["labels"] == labels.tolist()
    return same


def train_trl(data: Prepared, budget: Budget, seed: int, out: Path) -> tuple[Path, int]:
    trainer = trl_trainer(data, budget, seed, out)
    same = same_tokens(trainer, data, budget)
    trainer.train()
    trainer.save_model(str(out / "hf"))
    return out / "hf", same


@torch.no_grad()
def assistant_nll(model_dir: Path, conversations: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> float:
    """Mean NLL of the assistant tokens of held-out conversations, each cut to ``seq_len + 1`` tokens as
    training cuts them, one at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    for ids, mask in conversations:
        ids, mask = torch.from_numpy(ids[: seq_len + 1]), torch.from_numpy(mask[: seq_len + 1])
        scored = mask[1:] > 0
        if not scored.any():
            continue
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits[scored], ids[1:][scored], reduction="sum"))
        count += int(scored.sum())
    return nll / count


def run(seeds: list[int], budget: Budget, work: Path) -> dict:
    started = time.time()
    data = prepare(work, budget)
    start = assistant_nll(data.start_hf, data.valid, budget.seq_len)
    rows = []
    for seed in seeds:
        out = work / f"seed{seed}"
        t0 = time.time()
        mine = assistant_nll(train_tessera(data, budget, seed, out / "tessera"), data.valid, budget.seq_len)
        t1 = time.time()
        peer_dir, same = train_trl(data, budget, seed, out / "trl")
        peer = assistant_nll(peer_dir, data.valid, budget.seq_len)
        rows.append({"seed": seed, "tessera_loss": mine, "trl_loss": peer, "trl_same_tokens": same,
                     "tessera_train_s": round(t1 - t0, 1), "trl_train_s": round(time.time() - t1, 1)})
        print(f"sft seed {seed}: held-out assistant loss tessera {mine:.4f} / trl {peer:.4f} "
              f"(TRL's tokens = Tessera's on {same} of {len(data.train)} records)", flush=True)
    summary = {side: mean_sd([r[f"{side}_loss"] for r in rows]) for side in ("tessera", "trl")}
    (tm, ts), (pm, ps) = summary["tessera"], summary["trl"]
    table = "\n".join([
        "| held-out assistant tokens | start | tessera sft | TRL SFTTrainer | tessera / TRL |",
        "|---|---:|---:|---:|---:|",
        f"| loss (nats) | {start:.4f} | {tm:.4f} ± {ts:.4f} | {pm:.4f} ± {ps:.4f} | {tm / pm:.3f} |",
        f"| perplexity | {math.exp(start):.2f} | {math.exp(tm):.2f} | {math.exp(pm):.2f} "
        f"| {math.exp(tm) / math.exp(pm):.3f} |"])
    return {"budget": {k: v for k, v in dataclasses.asdict(budget).items() if k != "beta"},
            "train_records": len(data.train), "valid_records": len(data.valid),
            "valid_assistant_tokens": int(sum(int((m[1 : budget.seq_len + 1] > 0).sum()) for _, m in data.valid)),
            "start_loss": start, "rows": rows, "summary": summary, "table": table,
            "seconds": round(time.time() - started, 1), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    return seeded_main(argv, "bench/sft_quality.py", __doc__,
                       f"the first {SMOKE.pairs} records, seed 0, {SMOKE.steps} SFT steps",
                       run, SMOKE, FULL)


if __name__ == "__main__":
    sys.exit(main())
