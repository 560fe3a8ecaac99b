"""Per-block transforms applied before wrapping: activation checkpointing and torch.compile."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them."""
    for block in model.blocks():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: nn.Module) -> None:
    """Compile block by block (one graph per block type, as torchtitan does)."""
    for block in model.blocks():
        block.compile()


def prepare(model: nn.Module, activation_checkpointing: bool, compile: bool) -> nn.Module:
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        compile_blocks(model)
    return model
