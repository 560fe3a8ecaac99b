"""Fixtures for the alignment tests: the shared real data and a tokenizer trained on it."""

from __future__ import annotations

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
