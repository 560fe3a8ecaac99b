"""Fixtures for the alignment tests: the shared real data and a tokenizer trained on it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

DATA = Path(__file__).parents[2] / "examples" / "data"  # copies of the shared real corpora


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE with Tessera's special and chat-role tokens, trained on instruction data."""
    from data.tokenizer import train_tokenizer

    records = json.loads((DATA / "sft_alpaca_en_demo.json").read_text())[:200]
    texts = (r["instruction"] + " " + r["output"] for r in records)
    return train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=600)


@dataclasses.dataclass(frozen=True)
class AlignCorpus:
    """Shards for the whole pipeline, each with a held-out split: text, SFT, preference pairs."""

    root: Path
    tokenizer: Path
    text: tuple[Path, Path]
    sft: tuple[Path, Path]
    pairs: tuple[Path, Path]


@pytest.fixture(scope="session")
def align_corpus(tmp_path_factory) -> AlignCorpus:
    """TinyStories text; rasbt's instruction set (1,000 train / 100 held out); rasbt's preference
    pairs on the same instructions (polite chosen, impolite rejected), split the same way."""
    from data.make_shards import make_shards
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("align_corpus")
    stories = [b for b in (DATA / "pretrain_tinystories_valid_head.txt").read_text().split("\n\n") if b.strip()]
    instructions = json.loads((DATA / "sft_rasbt_instruction_data.json").read_text())
    pairs = json.loads((DATA / "pref_rasbt_instruction_data_with_preference.json").read_text())
    splits = {
        "text": (stories[:600], stories[600:660]),
        "sft": (instructions[:1000], instructions[1000:]),
        "pairs": (pairs[:1000], pairs[1000:]),
    }
    chat = [f"{r['instruction']} {r['input']} {r['output']} {r['rejected']}" for r in pairs[:1000]]
    train_tokenizer(splits["text"][0] + chat, root / "tokenizer", vocab_size=1024)
    dirs: dict[str, tuple[Path, Path]] = {}
    for name, (train, valid) in splits.items():
        kind = {"text": "text", "sft": "sft", "pairs": "preference"}[name]
        for split, items in (("train", train), ("valid", valid)):
            source = root / f"{name}_{split}.{'txt' if kind == 'text' else 'json'}"
            source.write_text("\n\n".join(items) + "\n" if kind == "text" else json.dumps(items))
            make_shards([str(source)], root / "tokenizer", root / f"{name}_{split}", kind=kind, append_eos=True,
                        shard_bytes=64 << 10)
        dirs[name] = (root / f"{name}_train", root / f"{name}_valid")
    return AlignCorpus(root, root / "tokenizer", dirs["text"], dirs["sft"], dirs["pairs"])
