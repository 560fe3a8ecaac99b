"""The two extra recipes of the demo, one command each, on CPU in a few minutes:

- ``encoder``: MLM-pretrain a small BERT on the SMS Spam Collection's texts, fine-tune it as a
  spam/ham classifier, report validation accuracy against the majority-class baseline;
- ``seq2seq``: span-corruption-pretrain a small T5 on SCAN's training lines, fine-tune it on
  commands → actions, report greedy exact match on SCAN's test split (~0.95 in ~5 minutes on 2 cores;
  the fine-tuning lr stays at 1e-3: 3e-3 hardens the encoder's attention until T5's position bias
  cannot steer it, the encoder reads a bag of words and exact match falls to 2%).

Each stage is a `tessera` command (printed before it runs) with a YAML recipe in configs/recipes/.
The data is already clean, so there is no prep stage: split → tokenizer → shards → pretrain →
fine-tune → ``tessera eval``. ``--quick`` runs a few steps per stage (CI's smoke test).
"""

from __future__ import annotations

import json
from pathlib import Path

from launch.stages import DATA, Stages

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "recipes"
SMS = "cls_sms_spam_collection.tsv"
SCAN_TRAIN, SCAN_TEST = "seq2seq_scan_simple_train_quarter.txt", "seq2seq_scan_simple_test_quarter.txt"
QUICK = ["train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.eval_steps=2",
         "train.micro_batch_size=8"]


def split_lines(source: Path, out: Path, every: int = 10) -> tuple[Path, Path]:
    """Every ``every``-th non-empty line of ``source`` to ``out/valid<suffix>``, the rest to ``out/train<suffix>``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, valid = out / f"train{source.suffix}", out / f"valid{source.suffix}"
    train.write_text("".join(f"{x}\n" for i, x in enumerate(lines) if i % every != every - 1), encoding="utf-8")
    valid.write_text("".join(f"{x}\n" for i, x in enumerate(lines) if i % every == every - 1), encoding="utf-8")
    print(f"{source.name}: {len(lines) - len(lines) // every} train, {len(lines) // every} held out → {out}")
    return train, valid


class Recipe(Stages):
    """A pretrain → fine-tune → eval recipe; subclasses name the data and the stages."""

    def train_stage(self, task: str, config: str, run: str, *overrides: str) -> Path:
        """`tessera pretrain|sft --config configs/recipes/<config>.yaml ...` into ``out/run``."""
        run_dir = self.out / run
        quick = QUICK if self.mode == "quick" else []
        self.tessera(task, "--config", str(CONFIGS / f"{config}.yaml"), f"log.dir={run_dir}", "log.every=25",
                     "checkpoint.keep_last=1", *overrides, *quick)
        return run_dir

    def evaluate(self, run_dir: Path, data: Path, name: str) -> dict:
        """`tessera eval` of a run's latest checkpoint; the JSON it writes is returned."""
        result = self.out / f"eval-{name}.json"
        quick = ["--max-batches", "2"] if self.mode == "quick" else []
        self.tessera("eval", "--checkpoint", str(run_dir / "checkpoints"), "--data", str(data), "--batch-size", "128",
                     "--json", str(result), *quick)
        return json.loads(result.read_text())

    def shard(self, source: Path, tokenizer: Path, out: Path, kind: str, *extra: str) -> Path:
        self.tessera("shard", str(source), "--tokenizer", str(tokenizer), "--out", str(out), "--kind", kind,
                     "--workers", "1", *extra)
        return out


class EncoderRecipe(Recipe):
    def run(self) -> None:
        out = self.out
        self.stage("1/6 split the SMS Spam Collection (every 10th message held out)")
        train, valid = split_lines(DATA / SMS, out / "split")
        texts = {}
        for split, path in (("train", train), ("valid", valid)):
            texts[split] = out / "split" / f"{split}_text.txt"
            texts[split].write_text("".join(line.split("\t", 1)[1] + "\n" for line in path.read_text().splitlines()))

        self.stage("2/6 train a WordPiece tokenizer (BERT's) on the training messages")
        tokenizer = out / "tokenizer"
        self.tessera("tokenizer", "train", str(texts["train"]), "--vocab-size", "2048", "--model", "wordpiece",
                     "--out", str(tokenizer))

        self.stage("3/6 shards: plain text for MLM, label<TAB>text for classification")
        shards = out / "shards"
        for split in ("train", "valid"):
            self.shard(texts[split], tokenizer, shards / "text" / split, "text", "--txt-mode", "line", "--append-eos")
            self.shard(train if split == "train" else valid, tokenizer, shards / "sms" / split, "classification",
                       "--labels", "ham,spam", "--max-len", "128")

        self.stage("4/6 pretrain a small encoder (masked LM)")
        mlm = self.train_stage("pretrain", "encoder-mlm", "mlm", f"data.train={shards / 'text' / 'train'}")
        self.stage("5/6 fine-tune it as a classifier (a fresh 2-label head on the MLM encoder)")
        sms = shards / "sms"
        classifier = self.train_stage("sft", "encoder-classify", "classify", f"model.init={mlm / 'checkpoints'}",
                                      f"data.train={sms / 'train'}", f"data.valid={sms / 'valid'}")

        self.stage("6/6 evaluate: MLM perplexity and classification accuracy on the held-out messages")
        text = self.evaluate(mlm, shards / "text" / "valid", "mlm")
        cls = self.evaluate(classifier, shards / "sms" / "valid", "classify")
        self.summary.update({
            "MLM valid loss / perplexity": f"{text['loss']:.3f} / {text['ppl']:.1f}",
            "spam classifier valid accuracy": f"{cls['accuracy']:.4f} on {cls['samples']} messages",
            "majority-class (ham) baseline": f"{cls['majority_accuracy']:.4f}",
        })
        self.finish([mlm, classifier])


class Seq2SeqRecipe(Recipe):
    def run(self) -> None:
        out = self.out
        self.stage("1/6 split SCAN's training pairs (every 10th held out for validation; the test split stays)")
        train, valid = split_lines(DATA / SCAN_TRAIN, out / "split")
        test = DATA / SCAN_TEST

        self.stage("2/6 train a byte-level BPE tokenizer on the training lines (words split only at spaces)")
        tokenizer = out / "tokenizer"
        self.tessera("tokenizer", "train", str(train), "--vocab-size", "512", "--split", "whitespace",
                     "--out", str(tokenizer))

        self.stage("3/6 shards: the training lines as text for span corruption, and the command → action pairs")
        shards = out / "shards"
        self.shard(train, tokenizer, shards / "text" / "train", "text", "--txt-mode", "line", "--append-eos")
        for split, path in (("train", train), ("valid", valid), ("test", test)):
            self.shard(path, tokenizer, shards / "scan" / split, "seq2seq")

        self.stage("4/6 pretrain a small encoder-decoder (T5 span corruption)")
        span = self.train_stage("pretrain", "seq2seq-span", "span", f"data.train={shards / 'text' / 'train'}")
        self.stage("5/6 fine-tune it on commands → actions (teacher forcing)")
        scan = self.train_stage("sft", "seq2seq-scan", "scan", f"model.init={span / 'checkpoints'}",
                                f"data.train={shards / 'scan' / 'train'}", f"data.valid={shards / 'scan' / 'valid'}")

        self.stage("6/6 evaluate: greedy exact match on SCAN's test commands")
        result = self.evaluate(scan, shards / "scan" / "test", "scan")
        self.summary.update({
            "SCAN test exact match (greedy)": f"{result['exact_match']:.4f} on {result['samples']} commands",
            "SCAN test token accuracy / loss": f"{result['token_accuracy']:.4f} / {result['loss']:.4f}",
        })
        self.finish([span, scan])


RECIPES: dict[str, type[Recipe]] = {"encoder": EncoderRecipe, "seq2seq": Seq2SeqRecipe}
