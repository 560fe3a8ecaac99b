"""The Transformer block (self-attention, optional cross-attention, MLP; pre- or post-norm) and the
stack of blocks with its position machinery and final norm. Every architecture is made of these."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from model.attention import Attention, AttentionMask, KVCache
from model.config import ModelConfig, NormPosition, Pos
from model.mlp import MLP
from model.moe import MoE
from model.norm import make_norm
from model.position import Rope, make_score_bias


@dataclasses.dataclass(eq=False)
class BlockContext:
    """Everything a block needs besides its input; built once per stack forward."""

    mask: AttentionMask
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    memory: torch.Tensor | None = None  # encoder output, for cross-attention
    memory_mask: AttentionMask | None = None
    cache: KVCache | None = None


class Block(nn.Module):
    """One Transformer layer. Pre-norm: ``x + f(norm(x))``; post-norm: ``norm(x + f(x))``."""

    def __init__(self, cfg: ModelConfig, layer_id: int, cross: bool = False) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == NormPosition.pre
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_id)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, layer_id + 1, cross=True) if cross else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, ctx.mask, rope=ctx.rope, cache=ctx.cache))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, ctx.memory_mask, memory=ctx.memory, cache=ctx.cache))
        return self._residual(x, self.mlp_norm, self.mlp)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))


class Stack(nn.Module):
    """A sequence of blocks sharing one position encoding (RoPE or a score bias) and a final norm.

    ``layer_offset`` numbers the attention layers of this stack apart from another stack's, so one
    :class:`KVCache` can hold both (each block uses two ids when it has cross-attention).
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool = False,
                 layer_offset: int = 0) -> None:
        super().__init__()
        self.causal = causal
        self.attn = cfg.attn
        self.sliding_window = cfg.sliding_window if causal else None
        step = 2 if cross else 1
        self.layers = nn.ModuleList(Block(cfg, layer_offset + step * i, cross) for i in range(n_layers))
        self.rope = Rope(cfg) if cfg.pos == Pos.rope else None
        self.score_bias = make_score_bias(cfg, causal)
        self.final_norm = make_norm(cfg) if cfg.norm_position == NormPosition.pre else None

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, key_padding: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, prefix_lengths: torch.Tensor | None = None,
                memory: torch.Tensor | None = None,
                memory_padding: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        q_offset = cache.length(self.layers[0].attn.layer_id) if cache is not None else 0
        key_padding, memory_padding = _drop_if_all_real(key_padding), _drop_if_all_real(memory_padding)
        mask = AttentionMask(causal=self.causal, q_offset=q_offset, key_padding=key_padding,
                             document_ids=document_ids, prefix_lengths=prefix_lengths,
                             sliding_window=self.sliding_window, bias=self.score_bias)
        ctx = BlockContext(
            mask=mask,
            rope=self.rope(position_ids, x.dtype) if self.rope is not None else None,
            memory=memory,
            memory_mask=AttentionMask(key_padding=memory_padding) if memory is not None else None,
            cache=cache,
        )
        batch, length = x.shape[:2]
        ctx.mask.prepare(self.attn, batch, length, q_offset + length, x.device, x.dtype)
        if ctx.memory_mask is not None:
            ctx.memory_mask.prepare(self.attn, batch, length, memory.shape[1], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.final_norm(x) if self.final_norm is not None else x


def _drop_if_all_real(padding: torch.Tensor | None) -> torch.Tensor | None:
    """None for a padding mask without padding, so SDPA may take its flash/cuDNN kernels (which take no
    mask) instead of the masked ones; as transformers does, at the cost of one host sync."""
    if padding is None or not bool(padding.all()):
        return padding
    return None
