"""Fixtures for the alignment tests: a real byte-level BPE tokenizer trained on the shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path("/work/shared/data")
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


class BPETokenizer:
    """A `tokenizers` BPE with BOS/EOS/PAD and chat role tokens, as a ChatTokenizer."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.chat_template = None
        self.bos_token, self.eos_token = "<|bos|>", "<|eos|>"
        self.bos_id = tok.token_to_id(self.bos_token)
        self.eos_id = tok.token_to_id(self.eos_token)
        self.pad_id = tok.token_to_id("<|pad|>")
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        return self.tok.token_to_id(token)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tokenizer() -> BPETokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>", *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    records = json.loads((DATA / "sft_alpaca_en_demo.json").read_text())[:200]
    tok.train_from_iterator((r["instruction"] + " " + r["output"] for r in records), trainer)
    return BPETokenizer(tok)
