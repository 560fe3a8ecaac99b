"""A tiny real corpus shared by the training tests: a BPE tokenizer and text shards, built once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

SOURCE = Path(__file__).parents[2] / "examples" / "data" / "pretrain_tinystories_valid_head.txt"


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokenizer: Path
    train: Path
    valid: Path


def _blocks(text: str, start: int, count: int) -> str:
    blocks = [b for b in text.split("\n\n") if b.strip()]
    return "\n\n".join(blocks[start : start + count]) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    from data.make_shards import make_shards
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    text = SOURCE.read_text()
    (root / "train.txt").write_text(_blocks(text, 0, 240))
    (root / "valid.txt").write_text(_blocks(text, 240, 40))
    train_tokenizer([_blocks(text, 0, 240)], root / "tokenizer", vocab_size=384)
    for split in ("train", "valid"):
        make_shards([str(root / f"{split}.txt")], root / "tokenizer", root / split, kind="text",
                    shard_bytes=8 << 10, append_eos=True, txt_mode="block")
    return Corpus(root / "tokenizer", root / "train", root / "valid")


@pytest.fixture(scope="session", autouse=True)
def warm_imports() -> None:
    """Import once in the parent what every rank needs: forked ranks inherit it (saves ~7 s per rank)."""
    import torch
    import torch.distributed.checkpoint
    import torch.distributed.fsdp

    import data.loader  # noqa: F401
    import model.io  # noqa: F401
    import trainer.run  # noqa: F401
    from trainer.strategy.deepspeed import import_deepspeed

    import_deepspeed()
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imported by initialize; compiles at import)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer imports torch._dynamo
