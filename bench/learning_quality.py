"""Learning quality: a decoder trained by ``tessera pretrain`` against the usual recipe, same tokens.

Per corpus, documents go through the real pipeline once (``tessera prep`` with its default filters
and dedup, every 10th kept document held out, ``tessera tokenizer train`` on the rest, ``tessera
shard --append-eos``). Then, per seed, the same budget of steps on the same training tokens:

- **tessera**: ``tessera pretrain`` (shuffled documents packed into rows, document masking), then
  ``tessera export`` to the Hugging Face layout;
- **peer**: the usual recipe, a plain PyTorch loop over a transformers ``LlamaForCausalLM`` of the
  same shape and its own init, fed ``group_texts``-style rows (every training document's tokens
  concatenated in order, cut into ``seq_len`` blocks) drawn at random, one pass over a permutation
  per epoch; AdamW with the same hyper-parameters (decay on matrices only) under transformers'
  cosine-with-min-lr schedule. For MLM the peer is ``BertForMaskedLM`` with transformers'
  ``DataCollatorForLanguageModeling``; for span corruption ``T5ForConditionalGeneration`` with the span
  corruption of transformers' T5 pretraining example (``run_t5_mlm_flax.py``'s ``DataCollatorForT5MLM``:
  15% noise in spans of mean 3, each span one sentinel) on the same ``group_texts`` rows.

Both models are loaded with ``AutoModelForCausalLM.from_pretrained`` and scored by the same code:
held-out documents one at a time, in windows of ``seq_len`` that continue where the previous one
stopped (every token but a document's first is predicted once), perplexity = exp(total NLL / tokens).
The unigram model of the training tokens and the untrained peer give the floor to beat.

    PYTHONPATH=. python bench/learning_quality.py [--corpora book,tinystories,c4] [--seeds 0,1,2] [--json F]
    PYTHONPATH=. python bench/learning_quality.py --smoke      # one corpus, one seed, a few steps (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
HELD_OUT_EVERY = 10  # every 10th kept document is held out
STORY_START = re.compile(r"^(Once upon a time|Once there was|Once, )")
BOOK_HEADING = re.compile(r"^(BOOK [A-Z]+:.*|CHAPTER [IVXLC]+|[A-Z ]*EPILOGUE.*)$")


def book_chapters(path: Path) -> list[str]:
    """A novel's chapters: text cut at its CHAPTER lines (a BOOK heading stays with the chapter it opens)."""
    chapters: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if BOOK_HEADING.match(line.strip()) and any(s.strip() and not BOOK_HEADING.match(s.strip())
                                                    for s in chapters[-1]):
            chapters.append([])
        chapters[-1].append(line)
    return [text for c in chapters if (text := "".join(c).strip())]


def stories(path: Path) -> list[str]:
    """TinyStories' stories: the file separates paragraphs and stories alike by a blank line, so a
    story is taken to start at a paragraph opening the way TinyStories stories open ("Once upon a time")."""
    docs: list[list[str]] = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        block = block.strip()
        if block:
            if not docs or STORY_START.match(block):
                docs.append([])
            docs[-1].append(block)
    return ["\n\n".join(d) for d in docs]


def records(path: Path) -> list[str]:
    """One document per JSONL record (its ``text``)."""
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class Corpus:
    file: str
    documents: Callable[[Path], list[str]]
    what: str


CORPORA = {
    "book": Corpus("pretrain_war_and_peace_books_1_4.txt", book_chapters, "War and Peace books 1-4, by chapter"),
    "tinystories": Corpus("pretrain_tinystories_valid_head.txt", stories, "TinyStories, by story"),
    "c4": Corpus("pretrain_c4_demo.jsonl", records, "C4 demo, by record"),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What both sides share: steps, batch, tokenizer size and the optimiser's settings."""

    steps: int
    warmup: int
    vocab: int
    seq_len: int = 128
    micro_batch: int = 16
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class Objective:
    """One pretraining objective: Tessera's model (preset and shape), the peer's transformers class,
    how the peer turns a batch of ``group_texts`` rows into a loss, and how held-out text is scored."""

    preset: str
    shape: dict[str, int]
    lr: float
    min_lr: float
    peer_class: str
    scored: str  # what the perplexity is over, for the table

    def tessera_overrides(self, budget: Budget) -> list[str]:
        return [
            f"model.preset={self.preset}", *(f"model.{k}={v}" for k, v in self.shape.items()),
            f"model.max_seq_len={budget.seq_len}", f"data.seq_len={budget.seq_len}", "data.num_workers=0",
            f"train.micro_batch_size={budget.micro_batch}", f"train.max_steps={budget.steps}", f"train.lr={self.lr}",
            f"train.min_lr={self.min_lr}", f"train.warmup_steps={budget.warmup}", "train.schedule=cosine",
            f"train.weight_decay={budget.weight_decay}", f"train.betas=[{budget.betas[0]},{budget.betas[1]}]",
            f"train.grad_clip={budget.clip}", "train.eval_every=0", "log.progress=false", "checkpoint.keep_last=1",
        ]


SHAPE = {"d_model": 128, "n_layers": 4, "n_heads": 4}
OBJECTIVES = {
    "clm": Objective("tiny-llama", {**SHAPE, "n_kv_heads": 2, "d_ff": 352}, 3e-3, 3e-4, "LlamaForCausalLM",
                     "next token, every token but a document's first"),
    # post-norm BERT at the decoder's 3e-3 diverges on both sides; 1e-3 is the usual BERT-small rate
    "mlm": Objective("tiny-bert", {**SHAPE, "d_ff": 512}, 1e-3, 1e-4, "BertForMaskedLM",
                     "15% of tokens masked, the same positions on both sides"),
    # the shipped recipe's rate (configs/pretrain/tiny-t5-span.yaml); pre-norm T5 v1.1 shape
    "span": Objective("tiny-t5", {**SHAPE, "n_decoder_layers": 4, "d_ff": 352}, 1e-3, 1e-4,
                      "T5ForConditionalGeneration",
                      "the corrupted-out tokens of 15% noise spans (mean 3), the same spans on both sides"),
}
FULL = Budget(steps=100, warmup=10, vocab=4096)
SMOKE = Budget(steps=50, warmup=5, vocab=1024)


def tessera(*args: str) -> None:
    """One `tessera` command, in this process, through the console script's own entry point."""
    from launch.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(list(args))
    if status:
        raise SystemExit(f"learning_quality: `tessera {' '.join(args)}` failed with status {status}\n{out.getvalue()}")


@dataclasses.dataclass
class Prepared:
    """One corpus after the pipeline: shard directories and token arrays of both splits."""

    name: str
    tokenizer: Path
    shards: Path
    train: list[np.ndarray]
    valid: list[np.ndarray]
    vocab_size: int
    mask_id: int
    special_ids: np.ndarray
    sentinel_ids: list[int]
    eos_id: int
    documents_in: int
    documents_kept: int


def prepare(name: str, work: Path, budget: Budget, limit: int | None) -> Prepared:
    """prep → held-out split → tokenizer → shards, all through the real commands."""
    corpus = CORPORA[name]
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    docs = corpus.documents(DATA / corpus.file)[:limit]
    raw = root / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": f"{name}:{i}", "text": t}, ensure_ascii=False) + "\n"
                           for i, t in enumerate(docs)))
    tessera("prep", str(raw), "--out", str(root / "prep"))
    kept = (root / "prep" / "documents.jsonl").read_text(encoding="utf-8").splitlines()
    split = {"train": [d for i, d in enumerate(kept) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1],
             "valid": [d for i, d in enumerate(kept) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]}
    for part, lines in split.items():
        (root / f"{part}.jsonl").write_text("".join(line + "\n" for line in lines))
    tessera("tokenizer", "train", str(root / "train.jsonl"), "--vocab-size", str(budget.vocab),
            "--out", str(root / "tokenizer"))
    for part in split:
        tessera("shard", str(root / f"{part}.jsonl"), "--tokenizer", str(root / "tokenizer"),
                "--out", str(root / "shards" / part), "--append-eos", "--workers", "1")
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(root / "tokenizer")
    return Prepared(name, root / "tokenizer", root / "shards", read_tokens(root / "shards" / "train"),
                    read_tokens(root / "shards" / "valid"), tok.vocab_size, tok.mask_id,
                    np.array(sorted(tok.special_ids)), tok.sentinel_ids, tok.eos_id, len(docs), len(kept))


def read_fields(shard_dir: Path) -> list[list[np.ndarray]]:
    """Per field of the shards' kind, every sample's array in shard order, as ``tessera shard`` stored it."""
    from data.shards import ShardManifest, check_shard, open_shard

    manifest = ShardManifest.load(shard_dir)
    fields: list[list[np.ndarray]] = [[] for _ in manifest.fields]
    for info in manifest.shards:
        buf = open_shard(manifest, info)
        index = check_shard(buf, manifest, info, verify_checksum=True)
        for f, name in enumerate(manifest.fields):
            dtype = manifest.field_dtype(name)
            fields[f] += [np.frombuffer(buf, dtype=dtype, count=int(n), offset=int(o)).astype(np.int64)
                          for o, n in zip(index.offsets[:, f], index.counts[:, f])]
    return fields


def tokens_sha256(docs: list[np.ndarray]) -> str:
    """One hash of every document's tokens, in order: two reports trained and scored on the same tokens share it."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(len(doc).to_bytes(8, "little") + doc.astype("<u4").tobytes())
    return digest.hexdigest()


def read_tokens(shard_dir: Path) -> list[np.ndarray]:
    """Every document's token array of a text shard directory."""
    return read_fields(shard_dir)[0]


def train_tessera(data: Prepared, objective: Objective, budget: Budget, seed: int, out: Path) -> Path:
    """`tessera pretrain` then `tessera export`; returns the Hugging Face directory."""
    run = out / "run"
    tessera("pretrain", *objective.tessera_overrides(budget), f"data.train={data.shards / 'train'}",
            f"train.seed={seed}", f"log.dir={run}")
    tessera("export", "--checkpoint", str(run / "checkpoints"), "--out", str(out / "hf"))
    return out / "hf"


def peer_model(data: Prepared, objective: Objective, budget: Budget):
    """The transformers model of the shape Tessera trains (Tessera's own mapping of its config), with
    transformers' own init."""
    import transformers

    from launch.entry import load
    from model.hf import config_to_hf

    cfg = load(None, objective.tessera_overrides(budget)).model.model_config()
    hf = config_to_hf(dataclasses.replace(cfg, vocab_size=data.vocab_size))
    model_class = getattr(transformers, objective.peer_class)
    return model_class(model_class.config_class(**hf))


def group_texts(docs: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """transformers' run_clm ``group_texts``: concatenate everything, cut into blocks, drop the rest."""
    stream = np.concatenate(docs)
    blocks = len(stream) // seq_len
    return torch.from_numpy(stream[: blocks * seq_len].reshape(blocks, seq_len))


def peer_batches(data: Prepared, objective: Objective) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Rows → model inputs: labels = inputs for CLM (the model shifts them); transformers'
    ``DataCollatorForLanguageModeling`` (15%, 80/10/10 over non-special tokens) for MLM; the T5
    example's span corruption for span."""
    if objective.peer_class == "LlamaForCausalLM":
        return lambda rows: {"input_ids": rows, "labels": rows}
    if objective.peer_class == "T5ForConditionalGeneration":
        return T5SpanCorruption(data.sentinel_ids, data.eos_id)
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(AutoTokenizer.from_pretrained(data.tokenizer), mlm_probability=0.15)
    return lambda rows: collator.torch_call([{"input_ids": r} for r in rows])


def train_peer(data: Prepared, objective: Objective, budget: Budget, seed: int, out: Path) -> tuple[Path, Path]:
    """The usual recipe; returns (the untrained model's directory, the trained model's directory)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    torch.manual_seed(seed)
    model = peer_model(data, objective, budget)
    model.save_pretrained(out / "init")
    rows = group_texts(data.train, budget.seq_len)
    to_inputs = peer_batches(data, objective)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": budget.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=objective.lr, betas=budget.betas)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, budget.warmup, budget.steps,
                                                           min_lr=objective.min_lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(budget.steps):
        while len(order) < budget.micro_batch:  # a fresh permutation per epoch, like a RandomSampler
            order = torch.cat([order, torch.randperm(len(rows), generator=generator)])
        batch, order = rows[order[: budget.micro_batch]], order[budget.micro_batch :]
        loss = model(**to_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), budget.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out / "hf")
    return out / "init", out / "hf"


def perplexity(model_dir: Path, docs: list[np.ndarray], seq_len: int, objective: Objective, data: Prepared) -> float:
    """Held-out perplexity of a transformers model directory, by the objective's scorer."""
    import transformers

    model = getattr(transformers, objective.peer_class).from_pretrained(model_dir).eval()
    if objective.peer_class == "LlamaForCausalLM":
        return causal_perplexity(model, docs, seq_len)
    if objective.peer_class == "T5ForConditionalGeneration":
        return span_perplexity(model, docs, seq_len, sentinel_ids=data.sentinel_ids, eos_id=data.eos_id)
    return masked_perplexity(model, docs, seq_len, mask_id=data.mask_id, special=data.special_ids)


@torch.no_grad()
def causal_perplexity(model, docs: list[np.ndarray], seq_len: int) -> float:
    """One document at a time, in windows of ``seq_len`` that continue where the previous one stopped:
    every token but a document's first is predicted once."""
    nll, count = 0.0, 0
    for doc in docs:
        ids = torch.from_numpy(doc)
        for start in range(0, len(ids) - 1, seq_len - 1):
            window = ids[start : start + seq_len]
            logits = model(input_ids=window[None]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += len(window) - 1
    return math.exp(nll / count)


MASK_SEED = 20261202  # the held-out masks: one draw, the same for every model scored


@torch.no_grad()
def masked_perplexity(model, docs: list[np.ndarray], seq_len: int, *, mask_id: int, special: np.ndarray,
                      probability: float = 0.15) -> float:
    """One document at a time, in consecutive windows of ``seq_len``: ``probability`` of each window's
    ordinary tokens (at least one) are replaced by the mask token and predicted."""
    rng = np.random.default_rng(MASK_SEED)
    nll, count = 0.0, 0
    for doc in docs:
        for start in range(0, len(doc), seq_len):
            window = doc[start : start + seq_len]
            candidates = np.flatnonzero(~np.isin(window, special))
            if not len(candidates):
                continue
            picked = rng.choice(candidates, max(1, round(probability * len(candidates))), replace=False)
            masked = window.copy()
            masked[picked] = mask_id
            logits = model(input_ids=torch.from_numpy(masked)[None]).logits[0, picked]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(window[picked]), reduction="sum"))
            count += len(picked)
    return math.exp(nll / count)


@torch.no_grad()
def span_perplexity(model, docs: list[np.ndarray], seq_len: int, *, sentinel_ids: list[int], eos_id: int,
                    density: float = 0.15, mean_span: float = 3.0) -> float:
    """One document at a time, in consecutive windows of ``seq_len``: each window span-corrupted (one
    draw, the same for every model scored; Tessera's ``corrupt_spans``), perplexity of the decoder at the
    corrupted-out tokens (sentinels and EOS in the target are fed, not scored)."""
    from data.collate import corrupt_spans

    rng = np.random.default_rng(MASK_SEED)
    nll, count = 0.0, 0
    for doc in docs:
        for start in range(0, len(doc), seq_len):
            window = doc[start : start + seq_len]
            if len(window) < 2:
                continue
            inputs, target = corrupt_spans(window, rng, sentinel_ids=sentinel_ids, eos_id=eos_id, density=density,
                                           mean_span=mean_span)
            labels = torch.from_numpy(target)[None]
            logits = model(input_ids=torch.from_numpy(inputs)[None], labels=labels).logits[0]
            scored = torch.from_numpy(~np.isin(target, [*sentinel_ids, eos_id]))
            nll += float(torch.nn.functional.cross_entropy(logits[scored], labels[0][scored], reduction="sum"))
            count += int(scored.sum())
    return math.exp(nll / count)


class T5SpanCorruption:
    """The span corruption of transformers' T5 pretraining example (``DataCollatorForT5MLM`` in
    examples/flax/language-modeling/run_t5_mlm_flax.py) on rows of token ids: per row, noise and kept
    lengths by random segmentation, each noise span replaced by the next sentinel in the input and
    kept runs by sentinels in the labels; EOS closes both (T5's preprocessors append it). Its random
    draws are seeded from torch's global generator, as the other peers' collators are."""

    def __init__(self, sentinel_ids: list[int], eos_id: int, density: float = 0.15, mean_span: float = 3.0) -> None:
        self.sentinels, self.eos_id, self.density, self.mean_span = np.array(sentinel_ids), eos_id, density, mean_span
        self.rng = np.random.default_rng(int(torch.randint(2**31, ())))

    def noise_mask(self, length: int) -> np.ndarray:
        noise = int(np.round(length * self.density))
        spans = max(int(np.round(min(noise, length - noise) / self.mean_span)), 1)

        def segments(items: int) -> np.ndarray:  # ``items`` split into ``spans`` positive lengths
            first = np.arange(items - 1) < spans - 1
            self.rng.shuffle(first)
            return np.unique(np.cumsum(np.pad(first, [[1, 0]])), return_counts=True)[1]

        lengths = np.stack([segments(length - noise), segments(noise)], axis=1).reshape(-1)
        starts = np.zeros(length, dtype=np.int8)
        starts[np.cumsum(lengths)[:-1]] = 1
        return np.cumsum(starts) % 2 == 1

    def filter(self, row: np.ndarray, runs: np.ndarray) -> np.ndarray:
        first = runs & ~np.pad(runs[:-1], [[1, 0]])
        sentinel = self.sentinels[np.cumsum(first) - 1]
        return np.append(np.where(first, sentinel, row)[~runs | first], self.eos_id)

    def __call__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, labels = [], []
        for row in rows.numpy():
            noise = self.noise_mask(len(row))
            inputs.append(self.filter(row, noise))
            labels.append(self.filter(row, ~noise))
        return {"input_ids": torch.from_numpy(np.stack(inputs)), "labels": torch.from_numpy(np.stack(labels))}


def unigram_perplexity(data: Prepared) -> float:
    """The training tokens' unigram model (add-one), scored on the same held-out tokens."""
    counts = np.bincount(np.concatenate(data.train), minlength=data.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    scored = np.concatenate([d[1:] for d in data.valid])
    return math.exp(-float(logp[scored].mean()))


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Per objective and corpus: mean ± sd of each side, the ratio of means, the worst per-seed ratio."""
    out = []
    for objective, corpus in dict.fromkeys((r["objective"], r["corpus"]) for r in rows):
        mine = [r for r in rows if (r["objective"], r["corpus"]) == (objective, corpus)]
        t = [r["tessera_ppl"] for r in mine]
        p = [r["peer_ppl"] for r in mine]
        (tm, ts), (pm, ps) = mean_sd(t), mean_sd(p)
        out.append({"objective": objective, "corpus": corpus, "seeds": len(mine), "tessera_mean": tm,
                    "tessera_sd": ts, "peer_mean": pm, "peer_sd": ps, "ratio": tm / pm,
                    "worst_seed_ratio": max(a / b for a, b in zip(t, p)),
                    "unigram_ppl": mine[0]["unigram_ppl"], "initial_ppl": mine[0]["initial_ppl"]})
    return out


def table(summary: list[dict], prepared: dict[str, dict]) -> str:
    lines = ["| objective | corpus | docs kept (train / held out) | train tokens | unigram | untrained | tessera "
             "| peer (transformers loop) | ratio | worst seed |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        p = prepared[s["corpus"]]
        lines.append(
            f"| {s['objective']} | {s['corpus']} | {p['documents_kept']} of {p['documents_in']} "
            f"({p['train_docs']} / {p['valid_docs']}) | {p['train_tokens']:,} | {s['unigram_ppl']:.1f} "
            f"| {s['initial_ppl']:.0f} | {s['tessera_mean']:.2f} ± {s['tessera_sd']:.2f} "
            f"| {s['peer_mean']:.2f} ± {s['peer_sd']:.2f} | {s['ratio']:.3f} | {s['worst_seed_ratio']:.3f} |")
    return "\n".join(lines)


def quiet() -> None:
    """The trainer's per-step lines and transformers' progress bars off: the bench prints its own rows."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def seeded_main(argv: list[str] | None, prog: str, doc: str, smoke_help: str,
                run: Callable[[list[int], Any, Path], dict], smoke: Any, full: Any) -> int:
    """The command line the peer benches share: --seeds, --smoke (seed 0, the ``smoke`` budget), --work,
    --json; prints the report's table."""
    import tempfile

    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--work", type=Path, default=None, help="where shards and runs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and summary here")
    args = parser.parse_args(argv)
    try:
        seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected a comma list of integers, got {args.seeds!r}")
    quiet()
    with tempfile.TemporaryDirectory(prefix=Path(prog).stem.replace("_", "-") + "-") as tmp:
        report = run(seeds, smoke if args.smoke else full, args.work or Path(tmp))
    print(report["table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def choices(parser: argparse.ArgumentParser, value: str, known: dict, what: str) -> list[str]:
    """A comma list of names from ``known``; anything else is a one-line usage error."""
    names = [c.strip() for c in value.split(",") if c.strip()]
    unknown = [c for c in names if c not in known]
    if unknown or not names:
        parser.error(f"unknown {what} {unknown[0] if unknown else value!r}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/learning_quality.py", description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="clm", help=f"comma list of {', '.join(OBJECTIVES)} (default clm)")
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"comma list of {', '.join(CORPORA)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {FULL.steps})")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tinystories' first 200 stories, seed 0, {SMOKE.steps} steps, vocab {SMOKE.vocab}")
    parser.add_argument("--work", type=Path, default=None, help="where shards and runs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and summary here")
    parser.add_argument("--peer-from", type=Path, default=None, metavar="JSON",
                        help="reuse the peer side of an earlier report (same budget) where objective, corpus and "
                             "seed match: to measure a change to Tessera alone in half the time")
    args = parser.parse_args(argv)
    objectives = choices(parser, args.objectives, OBJECTIVES, "objective")
    corpora = ["tinystories"] if args.smoke else choices(parser, args.corpora, CORPORA, "corpus")
    try:
        seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected a comma list of integers, got {args.seeds!r}")
    budget = SMOKE if args.smoke else FULL
    if args.steps is not None:
        budget = dataclasses.replace(budget, steps=args.steps, warmup=max(1, args.steps // 10))
    quiet()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="learning-quality-") as tmp:
        work = args.work or Path(tmp)
        report = run(objectives, corpora, seeds, budget, work, limit=200 if args.smoke else None,
                     peers=earlier_peers(args.peer_from, budget))
    print(report["table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def run(objectives: list[str], corpora: list[str], seeds: list[int], budget: Budget, work: Path,
        limit: int | None, peers: dict | None = None) -> dict:
    peers = peers or {}
    started = time.time()
    rows, prepared = [], {}
    for name in corpora:
        data = prepare(name, work, budget, limit)
        prepared[name] = {"documents_in": data.documents_in, "documents_kept": data.documents_kept,
                          "train_docs": len(data.train), "valid_docs": len(data.valid),
                          "train_tokens": int(sum(len(d) for d in data.train)),
                          "valid_tokens": int(sum(len(d) for d in data.valid)),
                          "tokens_sha256": tokens_sha256(data.train + data.valid)}
        earlier = peers.get("corpora", {}).get(name)
        if earlier and any(earlier.get(k) != v for k, v in prepared[name].items() if k in earlier):
            raise SystemExit(f"learning_quality: --peer-from's {name} data differs ({earlier}); its peers do not apply")
        for objective in objectives:
            for seed in seeds:
                out = work / name / objective / f"seed{seed}"
                rows.append(row := run_seed(data, objective, seed, budget, out, peers.get((objective, name, seed))))
                print(f"{objective} {name} seed {seed}: tessera {row['tessera_ppl']:.2f} ({row['tessera_train_s']} s), "
                      f"peer {row['peer_ppl']:.2f} ({row['peer_train_s']} s), unigram {row['unigram_ppl']:.1f}, "
                      f"untrained {row['initial_ppl']:.0f}", flush=True)
    summary = summarise(rows)
    return {"budget": dataclasses.asdict(budget),
            "objectives": {o: dataclasses.asdict(OBJECTIVES[o]) for o in objectives},
            "tokens_per_run": budget.steps * budget.micro_batch * budget.seq_len, "held_out_every": HELD_OUT_EVERY,
            "corpora": prepared, "rows": rows, "summary": summary, "table": table(summary, prepared),
            "seconds": round(time.time() - started, 1), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def run_seed(data: Prepared, objective_name: str, seed: int, budget: Budget, out: Path,
             peer: dict | None = None) -> dict:
    """Both sides trained with one seed, and every model scored on the held-out documents. ``peer``: an
    earlier report's row for the same objective, corpus, seed and budget, whose peer side is reused (the
    peer never reads Tessera's loader, so a change there leaves it as it was)."""
    objective = OBJECTIVES[objective_name]
    t0 = time.time()
    tessera_dir = train_tessera(data, objective, budget, seed, out / "tessera")
    t1 = time.time()
    row = {"objective": objective_name, "corpus": data.name, "seed": seed,
           "tessera_ppl": perplexity(tessera_dir, data.valid, budget.seq_len, objective, data),
           "unigram_ppl": unigram_perplexity(data), "tessera_train_s": round(t1 - t0, 1)}
    if peer is not None:
        return {**row, **{k: peer[k] for k in ("peer_ppl", "initial_ppl", "peer_train_s")}, "peer_reused": True}
    init_dir, peer_dir = train_peer(data, objective, budget, seed, out / "peer")
    return {**row, "peer_ppl": perplexity(peer_dir, data.valid, budget.seq_len, objective, data),
            "initial_ppl": perplexity(init_dir, data.valid, budget.seq_len, objective, data),
            "peer_train_s": round(time.time() - t1, 1)}


def earlier_peers(path: Path | None, budget: Budget) -> dict:
    """--peer-from: an earlier report's rows by (objective, corpus, seed), and its ``corpora`` (checked
    against this run's data before a row is reused); its budget must be this one."""
    if path is None:
        return {}
    report = json.loads(path.read_text())
    if report["budget"] != json.loads(json.dumps(dataclasses.asdict(budget))):
        raise SystemExit(f"learning_quality: {path} was run with another budget; its peer rows do not apply")
    return {"corpora": report["corpora"], **{(r["objective"], r["corpus"], r["seed"]): r for r in report["rows"]}}


if __name__ == "__main__":
    sys.exit(main())
