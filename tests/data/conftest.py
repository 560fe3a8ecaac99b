"""Fixtures for the data tests: a real tokenizer and real shards built from examples/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.make_shards import make_shards
from data.readers import iter_documents
from data.tokenizer import train_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
STORIES = EXAMPLES / "pretrain_tinystories_valid_head.txt"


@pytest.fixture(scope="session")
def examples() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [d.text for d in iter_documents([STORIES])]
    texts += [d.text for d in iter_documents([EXAMPLES / "sft_alpaca_en_demo.json"], text_field="output")][:300]
    train_tokenizer(texts, out, vocab_size=700, num_sentinels=16)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def text_shards(tokenizer_dir, tmp_path_factory) -> Path:
    """1,000 blank-line blocks of TinyStories (each ending with EOS) in 5-6 shards."""
    out = tmp_path_factory.mktemp("text_shards") / "shards"
    subset = tmp_path_factory.mktemp("subset") / "stories.txt"
    blocks = STORIES.read_text().split("\n\n")[:1000]
    subset.write_text("\n\n".join(blocks))
    make_shards([str(subset)], tokenizer_dir, out, shard_bytes=30_000, append_eos=True, num_workers=2,
                txt_mode="block")
    return out


@pytest.fixture(scope="session")
def sft_shards(tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft_shards") / "shards"
    make_shards([str(EXAMPLES / "sft_rasbt_instruction_data.json")], tokenizer_dir, out, kind="sft",
                shard_bytes=40_000)
    return out


@pytest.fixture(scope="session")
def preference_shards(tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preference_shards") / "shards"
    make_shards([str(EXAMPLES / "pref_rasbt_instruction_data_with_preference.json")], tokenizer_dir, out,
                kind="preference", shard_bytes=40_000)
    return out
