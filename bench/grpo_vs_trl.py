"""GRPO: ``tessera align align.loss=grpo`` against TRL's ``GRPOTrainer``, same SFT'd start, task and budget.

The task is the one of tests/align/test_online_end_to_end.py: two-digit additions. A tiny decoder is
SFT'd (``tessera sft``) on additions whose answers, where the units carry, forget the carry 60% of the
time; GRPO with an exact-match reward then has to unlearn the habit from its own samples. The SFT model
is exported once and is both sides' start and KL reference. Per seed, the same budget:

- **tessera**: ``tessera align`` (``align.loss=grpo``, ``loss_aggregation=dapo``), then ``tessera export``;
- **trl**: ``trl.GRPOTrainer`` (``loss_type="dapo"``) on the same prompts as chat messages, with the same
  reward code (``trainer.rewards.exact_match`` on the decoded completion).

Same G (``num_generations``), prompts per step (TRL: ``per_device_train_batch_size`` = prompts × G, one
generation batch per step), steps, lr and warmup (constant after it), AdamW settings, clip, temperature,
``max_new_tokens``/``max_completion_length``, β (k3 KL), ε, group-scaled advantages, one update per rollout.
Both exports are scored by the same transformers code: greedy exact match on held-out additions. Reported
per side: held-out exact match, mean training reward over the first and last ten steps, seconds per step
(the training call's wall time over its steps; timings vary with the machine's load, learning numbers do not).

    PYTHONPATH=. python bench/grpo_vs_trl.py [--seeds 0,1,2] [--json F]
    PYTHONPATH=. python bench/grpo_vs_trl.py --smoke      # a short SFT, a few GRPO steps, one seed (CI)
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.learning_quality import mean_sd, read_fields, seeded_main, tessera

FORGET_CARRY = 0.6
MODEL = ("model.preset=tiny-llama", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=176", "model.max_seq_len=64")


@dataclasses.dataclass(frozen=True)
class Budget:
    sft_steps: int
    steps: int
    prompts: int  # per step; each gets num_generations completions
    num_generations: int
    held_out: int = 200
    sft_examples: int = 4000
    max_new_tokens: int = 5
    temperature: float = 0.7
    beta: float = 0.04
    epsilon: float = 0.2
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0


FULL = Budget(sft_steps=800, steps=60, prompts=16, num_generations=8)
SMOKE = Budget(sft_steps=60, steps=3, prompts=4, num_generations=4, held_out=40, sft_examples=1000, warmup=1)


def record(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}", "answer": str(a + b), "operands": [a, b]}


@dataclasses.dataclass
class Prepared:
    tokenizer: Path
    prompts: Path  # prompt shards
    prompt_records: list[dict]
    prompt_ids: list[np.ndarray]  # Tessera's tokens of each prompt record, in order
    held_out: list[tuple[int, int]]
    start: Path  # the SFT run's checkpoints
    start_hf: Path


def prepare(work: Path, budget: Budget) -> Prepared:
    """Every pair of two-digit numbers, shuffled: some held out, some for SFT (with the carry habit), the
    rest as GRPO prompts; a tokenizer whose digits stay single tokens; ``tessera sft`` then export."""
    from tokenizers import pre_tokenizers

    from data.tokenizer import special_tokens, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    held_out = pairs[: budget.held_out]
    sft_pairs = pairs[budget.held_out : budget.held_out + budget.sft_examples]
    prompt_pairs = pairs[budget.held_out + budget.sft_examples :]
    smallest = len(special_tokens()) + len(pre_tokenizers.ByteLevel.alphabet()) + 1  # no merges: digits apart
    train_tokenizer([f"{a}+{b} {a + b}" for a, b in sft_pairs[:2000]], work / "tokenizer", vocab_size=smallest)

    def answer(a: int, b: int) -> int:
        carry = a % 10 + b % 10 >= 10
        return a + b - 10 if carry and rng.random() < FORGET_CARRY else a + b

    prompt_records = [record(a, b) for a, b in prompt_pairs]
    for name, records, kind in (
            ("sft", [{"prompt": f"{a}+{b}", "completion": str(answer(a, b))} for a, b in sft_pairs], "sft"),
            ("prompts", prompt_records, "prompt")):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        tessera("shard", str(work / f"{name}.jsonl"), "--tokenizer", str(work / "tokenizer"), "--kind", kind,
                "--out", str(work / name), "--workers", "1")
    tessera("sft", *MODEL, f"data.train={work / 'sft'}", "data.seq_len=24", "data.num_workers=0",
            "train.micro_batch_size=32", f"train.max_steps={budget.sft_steps}", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_steps=10", "train.seed=0", "train.eval_every=0", "log.progress=false",
            "checkpoint.keep_last=1", f"log.dir={work / 'sft_run'}")
    tessera("export", "--checkpoint", str(work / "sft_run" / "checkpoints"), "--out", str(work / "sft_hf"))
    return Prepared(work / "tokenizer", work / "prompts", prompt_records, read_fields(work / "prompts")[0], held_out,
                    work / "sft_run" / "checkpoints", work / "sft_hf")


def train_tessera(data: Prepared, budget: Budget, seed: int, out: Path) -> tuple[Path, list[float], float]:
    """(export, reward per step, seconds per step)."""
    run = out / "run"
    started = time.time()
    tessera("align", *MODEL, f"model.init={data.start}", f"data.train={data.prompts}", "data.seq_len=24",
            "data.num_workers=0", f"train.micro_batch_size={budget.prompts}", f"train.max_steps={budget.steps}",
            f"train.lr={budget.lr}", f"train.min_lr={budget.lr}", f"train.warmup_steps={budget.warmup}",
            f"train.weight_decay={budget.weight_decay}", f"train.betas=[{budget.betas[0]},{budget.betas[1]}]",
            f"train.grad_clip={budget.clip}", f"train.seed={seed}", "train.eval_every=0", "log.progress=false",
            "checkpoint.keep_last=1", "align.loss=grpo", "align.reward=exact_match",
            f"align.num_generations={budget.num_generations}", f"align.max_new_tokens={budget.max_new_tokens}",
            f"align.temperature={budget.temperature}", f"align.beta={budget.beta}", f"align.epsilon={budget.epsilon}",
            "align.loss_aggregation=dapo", "align.scale_rewards=group", f"log.dir={run}")
    seconds = (time.time() - started) / budget.steps
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tessera("export", "--checkpoint", str(run / "checkpoints"), "--out", str(out / "hf"))
    return out / "hf", [m["reward"] for m in steps if "reward" in m], seconds


def exact_match_reward(prompts: list, completions: list, answer: list[str], **_) -> list[float]:
    """TRL's reward-function signature around Tessera's own ``exact_match`` (the same code on both sides)."""
    from trainer.rewards import exact_match

    return [exact_match("", c[0]["content"], {"answer": a}) for c, a in zip(completions, answer, strict=True)]


def trl_trainer(data: Prepared, budget: Budget, seed: int, out: Path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=budget.steps, num_generations=budget.num_generations,
        per_device_train_batch_size=budget.prompts * budget.num_generations,
        max_completion_length=budget.max_new_tokens,
        temperature=budget.temperature, top_p=1.0, top_k=0, beta=budget.beta, epsilon=budget.epsilon,
        loss_type="dapo", scale_rewards="group", num_iterations=1, learning_rate=budget.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=budget.warmup, weight_decay=budget.weight_decay,
        adam_beta1=budget.betas[0], adam_beta2=budget.betas[1], max_grad_norm=budget.clip, seed=seed, data_seed=seed,
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, disable_tqdm=True,
    )
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in data.prompt_records]
    datasets.disable_progress_bars()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(data.start_hf), args=args,
                          reward_funcs=exact_match_reward, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(data.start_hf))
    trainer.remove_callback(PrinterCallback)
    return trainer, rows


def train_trl(data: Prepared, budget: Budget, seed: int, out: Path) -> tuple[Path, list[float], float, int]:
    """(export, reward per step, seconds per step, prompts TRL tokenizes into Tessera's tokens)."""
    trainer, rows = trl_trainer(data, budget, seed, out)
    trl_ids = trainer._tokenize_prompts([r["prompt"] for r in rows])[0]  # TRL's own prompt path
    same = sum(list(a) == b.tolist() for a, b in zip(trl_ids, data.prompt_ids, strict=True))
    started = time.time()
    trainer.train()
    seconds = (time.time() - started) / budget.steps
    trainer.save_model(str(out / "hf"))
    return out / "hf", [m["reward"] for m in trainer.state.log_history if "reward" in m], seconds, same


@torch.no_grad()
def held_out_exact_match(model_dir: Path, data: Prepared, budget: Budget) -> float:
    """Greedy answers of a transformers model directory to the held-out additions (left-padded prompts,
    Tessera's prompt tokens), compared with the true sums."""
    from transformers import AutoModelForCausalLM

    from data.conversations import encode_prompt
    from data.tokenizer import load_tokenizer
    from trainer.rewards import normalise

    tokenizer = load_tokenizer(data.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [encode_prompt(record(a, b), tokenizer)[0] for a, b in data.held_out]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_id).long(), do_sample=False,
                         max_new_tokens=budget.max_new_tokens, eos_token_id=[tokenizer.eos_id, tokenizer.end_id],
                         pad_token_id=tokenizer.pad_id)
    texts = [normalise(tokenizer.decode(row[width:].tolist(), skip_special_tokens=True)) for row in out]
    return statistics.mean(t == str(a + b) for t, (a, b) in zip(texts, data.held_out))


def reward_ends(rewards: list[float]) -> tuple[float, float]:
    """Mean training reward over the first and the last ten steps (a third of the steps when under 30)."""
    k = max(1, min(10, len(rewards) // 3))
    return statistics.mean(rewards[:k]), statistics.mean(rewards[-k:])


def run(seeds: list[int], budget: Budget, work: Path) -> dict:
    started = time.time()
    data = prepare(work, budget)
    start = held_out_exact_match(data.start_hf, data, budget)
    rows = []
    for seed in seeds:
        out = work / f"seed{seed}"
        row: dict = {"seed": seed}
        mine_dir, mine_rewards, row["tessera_s_per_step"] = train_tessera(data, budget, seed, out / "tessera")
        peer_dir, peer_rewards, row["trl_s_per_step"], row["trl_same_prompt_tokens"] = train_trl(
            data, budget, seed, out / "trl")
        for side, model_dir, rewards in (("tessera", mine_dir, mine_rewards), ("trl", peer_dir, peer_rewards)):
            if len(rewards) != budget.steps:
                raise SystemExit(f"grpo_vs_trl: {side} logged {len(rewards)} rewards for {budget.steps} steps")
            row[f"{side}_exact_match"] = held_out_exact_match(model_dir, data, budget)
            row[f"{side}_reward_first"], row[f"{side}_reward_last"] = reward_ends(rewards)
            row[f"{side}_reward_mean"] = statistics.mean(rewards)
            row[f"{side}_rewards"] = rewards
        rows.append(row)
        print(f"grpo seed {seed}: held-out exact match {start:.3f} -> tessera {row['tessera_exact_match']:.3f} / "
              f"trl {row['trl_exact_match']:.3f}; s/step {row['tessera_s_per_step']:.2f} / "
              f"{row['trl_s_per_step']:.2f}", flush=True)
    metrics = ("exact_match", "reward_first", "reward_last", "reward_mean", "s_per_step")
    summary = {side: {k: mean_sd([r[f"{side}_{k}"] for r in rows]) for k in metrics} for side in ("tessera", "trl")}
    lines = [f"| metric (mean ± sd over {len(rows)} seeds) | SFT start | tessera align (grpo, dapo) "
             "| TRL GRPOTrainer (dapo) |",
             "|---|---:|---:|---:|"]
    for k, what in (("exact_match", f"held-out exact match ({len(data.held_out)} additions, greedy)"),
                    ("reward_first", "training reward, first 10 steps"),
                    ("reward_last", "training reward, last 10 steps"), ("reward_mean", "training reward, all steps"),
                    ("s_per_step", "seconds per step (load-dependent)")):
        (tm, ts), (pm, ps) = summary["tessera"][k], summary["trl"][k]
        first = f"{start:.3f}" if k == "exact_match" else ""
        lines.append(f"| {what} | {first} | {tm:.3f} ± {ts:.3f} | {pm:.3f} ± {ps:.3f} |")
    return {"budget": dataclasses.asdict(budget), "prompt_records": len(data.prompt_records),
            "start_exact_match": start,
            "rows": rows, "summary": summary, "table": "\n".join(lines), "seconds": round(time.time() - started, 1),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    return seeded_main(argv, "bench/grpo_vs_trl.py", __doc__,
                       f"{SMOKE.sft_steps} SFT steps, {SMOKE.steps} GRPO steps, seed 0",
                       run, SMOKE, FULL)


if __name__ == "__main__":
    sys.exit(main())
