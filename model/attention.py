"""Attention: the mask description, the backend registry (eager, sdpa, flex) and the attention layer.

An :class:`AttentionMask` says what each query may see (causal, prefix-LM, sliding window, same
document, non-padding keys) and which score bias applies (ALiBi, T5). Each backend turns it into what its
kernel wants: eager and SDPA a dense boolean/additive mask (or ``is_causal`` alone when the mask
is plainly causal), flex a ``BlockMask`` plus a ``score_mod``. Eager is the reference. ``auto`` (the
default) is SDPA, except on CUDA for self-attention over a whole sequence whose mask SDPA's flash /
cuDNN kernels cannot take (documents, prefix-LM, sliding window, ALiBi, T5 bias): there compiled
FlexAttention keeps it fused instead of materialising a [B, H, T, T] mask.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from model import kernels
from model.config import Attn, Kernels, ModelConfig
from model.norm import RMSNorm
from model.position import apply_rope


@dataclasses.dataclass(eq=False)
class AttentionMask:
    """Which keys each query sees. Query i sits at key index ``q_offset + i`` (cached keys first)."""

    causal: bool = False
    q_offset: int = 0
    prefix_lengths: torch.Tensor | None = None  # [B] prefix-LM: keys before it are visible to every query
    key_padding: torch.Tensor | None = None  # [B, Tk] bool, True = a real token
    document_ids: torch.Tensor | None = None  # [B, T] (self-attention without cache)
    sliding_window: int | None = None
    bias: nn.Module | None = None  # Alibi / T5Bias
    _memo: dict = dataclasses.field(default_factory=dict, repr=False)

    def prepare(self, attn: Attn, batch: int, tq: int, tk: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build what backend ``attn`` will ask for now, outside the blocks (so compiled blocks only
        read it). Whatever is not prepared is still built on first use."""
        if attn == Attn.flex or (attn == Attn.auto and self.wants_flex(device, tq, tk, dropout_p=0.0)):
            self.block_mask(batch, tq, tk, device)
        elif attn == Attn.eager or self.bias is not None:
            self.additive(tq, tk, device, dtype)
        elif not self.plain_causal(tq, tk):
            self.allowed(tq, tk, device)

    def wants_flex(self, device: torch.device, tq: int, tk: int, dropout_p: float) -> bool:
        """Whether ``auto`` runs FlexAttention: CUDA, no dropout, no KV cache (a growing cache would
        recompile flex every step), and a mask or bias beyond causal + key padding."""
        special = (self.document_ids is not None or self.prefix_lengths is not None
                   or self.sliding_window is not None or self.bias is not None)
        return device.type == "cuda" and not dropout_p and self.q_offset == 0 and tq == tk and special

    def plain_causal(self, tq: int, tk: int) -> bool:
        """True when the mask is exactly the lower triangle SDPA's ``is_causal`` applies."""
        return (self.causal and self.q_offset == 0 and tq == tk and self.key_padding is None
                and self.prefix_lengths is None
                and self.document_ids is None and self.sliding_window is None and self.bias is None)

    def allowed(self, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [B|1, 1, Tq, Tk] (True = may attend), or None when every key is visible.

        A query that may see no key at all (a padding query) is let see every key, so that
        softmax stays finite; its output is meaningless and must be ignored by the caller.
        """
        key = ("allowed", tq, tk)
        if key not in self._memo:
            self._memo[key] = self._allowed(tq, tk, device)
        return self._memo[key]

    def _allowed(self, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
        q = torch.arange(tq, device=device)[:, None] + self.q_offset
        k = torch.arange(tk, device=device)[None, :]
        ok: torch.Tensor | None = None

        def both(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
            return b if a is None else a & b

        if self.causal and not (tq == 1 and self.q_offset == tk - 1):
            seen = (k <= q)[None, None]
            if self.prefix_lengths is not None:
                seen = seen | (k[None, None] < self.prefix_lengths[:, None, None, None])
            ok = both(ok, seen)
        if self.sliding_window is not None:
            ok = both(ok, (q - k < self.sliding_window)[None, None])
        if self.document_ids is not None:
            docs = self.document_ids
            ok = both(ok, (docs[:, :, None] == docs[:, None, :])[:, None])
        if self.key_padding is not None:
            ok = both(ok, self.key_padding.bool()[:, None, None, :])
        if ok is None:
            return None
        return ok | ~ok.any(dim=-1, keepdim=True)

    def additive(self, tq: int, tk: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Float [B|1, H|1, Tq, Tk]: score bias plus -inf where not allowed (None if neither applies)."""
        key = ("additive", tq, tk, dtype)
        if key not in self._memo:
            allowed = self.allowed(tq, tk, device)
            out = None
            if self.bias is not None:
                q = torch.arange(tq, device=device) + self.q_offset
                out = self.bias.dense(q, torch.arange(tk, device=device))[None].to(dtype)
            if allowed is not None:
                blocked = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, -math.inf)
                out = blocked if out is None else out + blocked
            self._memo[key] = out
        return self._memo[key]

    def block_mask(self, batch: int, tq: int, tk: int, device: torch.device):
        """FlexAttention ``BlockMask`` for this mask (None when every key is visible)."""
        key = ("block", batch, tq, tk)
        if key not in self._memo:
            self._memo[key] = self._block_mask(batch, tq, tk, device)
        return self._memo[key]

    def _block_mask(self, batch: int, tq: int, tk: int, device: torch.device):
        from torch.nn.attention.flex_attention import and_masks, create_block_mask

        offset, window, docs, padding = self.q_offset, self.sliding_window, self.document_ids, self.key_padding
        prefix = self.prefix_lengths
        mods = []
        if self.causal and prefix is not None:
            mods.append(lambda b, h, q, k: (k <= q + offset) | (k < prefix[b]))
        elif self.causal:
            mods.append(lambda b, h, q, k: k <= q + offset)
        if window is not None:
            mods.append(lambda b, h, q, k: q + offset - k < window)
        if docs is not None:
            mods.append(lambda b, h, q, k: docs[b, q] == docs[b, k])
        if padding is not None:
            padding = padding.bool()
            mods.append(lambda b, h, q, k: padding[b, k])
        if not mods:
            return None
        per_row = docs is not None or padding is not None or prefix is not None
        return create_block_mask(and_masks(*mods), batch if per_row else None, None, tq, tk, device=str(device))


def eager_attention(q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
    """Reference: explicit scores, additive mask, fp32 softmax."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    additive = mask.additive(q.shape[2], k.shape[2], q.device, scores.dtype)
    if additive is not None:
        scores = scores + additive
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
    """torch's fused SDPA; a plainly causal mask goes as ``is_causal`` (flash/cuDNN eligible)."""
    tq, tk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if mask.plain_causal(tq, tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    attn_mask = (mask.allowed(tq, tk, q.device) if mask.bias is None
                 else mask.additive(tq, tk, q.device, q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=gqa)


_compiled_flex: Callable | None = None


def flex_attention(q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
    """FlexAttention: BlockMask for masking, score_mod for ALiBi / T5 bias (compiled on CUDA)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise UserError("attn=flex has no backward on CPU (torch FlexAttention); train on CPU with attn=sdpa")
    if q.is_cuda and not torch.compiler.is_compiling():  # inside a compiled block, dynamo compiles flex itself
        _compiled_flex = _compiled_flex or torch.compile(flex, dynamic=False)
        flex = _compiled_flex
    block_mask = mask.block_mask(q.shape[0], q.shape[2], k.shape[2], q.device)
    score_mod = mask.bias.score_mod(mask.q_offset) if mask.bias is not None else None
    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                enable_gqa=k.shape[1] != q.shape[1])


def auto_attention(q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
    """SDPA, or FlexAttention where :meth:`AttentionMask.wants_flex` says so."""
    if mask.wants_flex(q.device, q.shape[2], k.shape[2], dropout_p):
        return flex_attention(q, k, v, mask, scale, dropout_p)
    return sdpa_attention(q, k, v, mask, scale, dropout_p)


BACKENDS: dict[Attn, Callable[..., torch.Tensor]] = {
    Attn.auto: auto_attention,
    Attn.eager: eager_attention,
    Attn.sdpa: sdpa_attention,
    Attn.flex: flex_attention,
}


class KVCache:
    """Keys and values of already-processed tokens, per attention layer (for decoding).

    Self-attention entries grow by concatenation; cross-attention entries (the encoder memory's
    keys and values) are computed once. ``reorder`` follows beams.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def length(self, layer_id: int) -> int:
        entry = self.entries.get(layer_id)
        return 0 if entry is None else entry[0].shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        self.entries = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.entries.items()}


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads; self-attention (fused qkv) or cross-attention."""

    def __init__(self, cfg: ModelConfig, layer_id: int, cross: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.cross = cross
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.head_dim**-0.5
        self.dropout = cfg.dropout
        self.backend = BACKENDS[cfg.attn]
        self.liger = cfg.kernels == Kernels.liger
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        if cross:
            self.q = nn.Linear(cfg.d_model, q_dim, bias=qkv_bias)
            self.kv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, mask: AttentionMask, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        if self.cross:
            q = self._norm_q(self.q(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2))
            if cache is not None and self.layer_id in cache.entries:
                k, v = cache.entries[self.layer_id]
            else:
                k, v = self._split_kv(self.kv(memory))
                if cache is not None:
                    cache.entries[self.layer_id] = (k, v)
        else:
            q_dim = self.n_heads * self.head_dim
            qkv = self.qkv(x)
            q = self._norm_q(qkv[..., :q_dim].view(batch, length, self.n_heads, self.head_dim).transpose(1, 2))
            k, v = self._split_kv(qkv[..., q_dim:])
            if rope is not None and kernels.use_liger(self.liger, q):
                q, k = kernels.rope(q, k, *rope)
            elif rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                if self.layer_id in cache.entries:
                    past_k, past_v = cache.entries[self.layer_id]
                    k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                cache.entries[self.layer_id] = (k, v)
        dropout_p = self.dropout if self.training else 0.0
        out = self.backend(q, k, v, mask, self.scale, dropout_p)
        return self.out(out.transpose(1, 2).reshape(batch, length, -1))

    def _split_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = kv.shape
        kv = kv.view(batch, length, 2, self.n_kv_heads, self.head_dim)
        k = kv[:, :, 0].transpose(1, 2)
        return (self.k_norm(k) if self.k_norm is not None else k), kv[:, :, 1].transpose(1, 2)

    def _norm_q(self, q: torch.Tensor) -> torch.Tensor:
        return self.q_norm(q) if self.q_norm is not None else q
