"""Per-block transforms applied before wrapping: activation checkpointing and torch.compile.

Activation checkpointing (``train.activation_checkpointing``):

- ``none``: autograd keeps every tensor each op saves for its backward.
- ``full``: each block keeps only its input; the whole block's forward runs again in backward
  (least memory, about one extra forward of compute).
- ``selective``: per op, inside each block (torchtitan's "op" policy): the outputs of matrix
  products and attention are kept, everything else (norms, activations, RoPE, dropout masks, casts)
  is recomputed in backward. Costs little compute — the recomputed ops are elementwise — and drops
  the elementwise ops' saved tensors, of which the fp32 norm statistics and the gated MLP's
  [T, 2·d_ff] intermediates are the largest.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from trainer.config import ActivationCheckpointing


def _saved_ops() -> frozenset:
    """Ops whose outputs ``selective`` keeps: matmuls and every fused attention kernel torch has."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    ops.add(torch.ops.higher_order.flex_attention)
    return frozenset(ops)


SAVED_OPS = _saved_ops()


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks(model: nn.Module, mode: ActivationCheckpointing = ActivationCheckpointing.full) -> None:
    """Recompute each block's activations (all, or all but matmul/attention outputs) in backward."""
    mode = ActivationCheckpointing(mode)
    if mode is ActivationCheckpointing.none:
        return
    options = {"use_reentrant": False}
    if mode is ActivationCheckpointing.selective:
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls_and_attention)
    for block in model.blocks():
        block.forward = functools.partial(checkpoint, block.forward, **options)


def compile_blocks(model: nn.Module) -> None:
    """Compile block by block (one graph per block type, as torchtitan does)."""
    for block in model.blocks():
        block.compile()


def prepare(model: nn.Module, activation_checkpointing: ActivationCheckpointing | str, compile: bool) -> nn.Module:
    checkpoint_blocks(model, ActivationCheckpointing(activation_checkpointing))
    if compile:
        compile_blocks(model)
    return model
