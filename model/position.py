"""Position encodings, one registry: absolute (learned, sinusoidal) added to embeddings, RoPE applied
to queries and keys, and score biases (ALiBi, T5 relative buckets) added to attention scores.

Score biases expose two views of the same function of (head, query index, key index): ``dense``
for eager/SDPA (a materialised [H, Tq, Tk] tensor) and ``score_mod`` for FlexAttention.
Both depend only on key - query, so a uniform shift (left padding, a KV cache) leaves them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from model.config import ModelConfig, Pos


class AbsolutePositions(nn.Module):
    """Learned (a trained table) or sinusoidal (fixed, Vaswani et al.) position vectors."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        self.learned = cfg.pos == Pos.learned
        if self.learned:
            self.table = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            self.register_buffer("table", torch.empty(cfg.max_seq_len, cfg.d_model), persistent=False)
            self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.learned:
            return
        n, d = self.table.shape
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        table = torch.zeros(n, d)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        self.table = table.to(self.table.device)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.learned:
            return self.table(position_ids)
        return self.table[position_ids]


class Rope(nn.Module):
    """Rotary embeddings (half-split layout, as Llama in transformers); cos/sin cached to max_seq_len."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.register_buffer("cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        angles = torch.outer(torch.arange(self.cos.shape[0], dtype=torch.float32), rope_frequencies(self.config))
        angles = torch.cat([angles, angles], dim=-1).to(self.cos.device)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, head_dim] in ``dtype`` for ``position_ids`` [B, T] (< max_seq_len);
        the angles are computed in fp32 once, then cast (as transformers' Llama does)."""
        return self.cos[position_ids][:, None].to(dtype), self.sin[position_ids][:, None].to(dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama 3.1's scaling when ``rope_scaling_factor`` is set:
    long wavelengths divided by the factor, short ones kept, the band between interpolated."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = cfg.rope_scaling_factor
    if factor is None:
        return inv_freq
    low, high, context = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_seq_len
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, head_dim] by the angles in cos/sin (half-split pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ScoreBias(nn.Module):
    """A bias added to attention scores, ``bias(head, query index, key index)``, written once with
    broadcasting tensor ops so that the dense view (eager / SDPA) and FlexAttention's ``score_mod``
    run the very same code."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self._training_mod: ScoreMod | None = None

    def bias(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """[H, Tq, Tk] for query indices ``q_idx`` and key indices ``k_idx``."""
        heads = torch.arange(self.n_heads, device=q_idx.device)
        return self.bias(heads[:, None, None], q_idx[None, :, None], k_idx[None, None, :])

    def score_mod(self, q_offset: int) -> ScoreMod:
        """FlexAttention score_mod; the offset-0 one (training) is built once, so compiled flex reuses it."""
        if q_offset == 0 and self._training_mod is not None:
            return self._training_mod

        def mod(score, b, h, q_idx, kv_idx):
            return score + self.bias(h, q_idx + q_offset, kv_idx)

        if q_offset == 0:
            self._training_mod = mod
        return mod


class Alibi(ScoreBias):
    """ALiBi: score bias ``-slope_h * |q - k|`` (symmetric, so it also serves a bidirectional encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.n_heads)
        self.register_buffer("slopes", torch.empty(cfg.n_heads), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.slopes = alibi_slopes(self.n_heads).to(self.slopes.device)

    def bias(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return -self.slopes[h] * (q - k).abs()


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Geometric slopes of the ALiBi paper, interleaved for a head count that is not a power of 2."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(n_heads - closest)]
    return torch.tensor(base + extra, dtype=torch.float32)


class T5Bias(ScoreBias):
    """T5 relative attention bias: a learned [num_buckets, n_heads] table indexed by bucketed k - q."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__(cfg.n_heads)
        self.bidirectional = bidirectional
        self.num_buckets = cfg.t5_num_buckets
        self.max_distance = cfg.t5_max_distance
        self.table = nn.Embedding(cfg.t5_num_buckets, cfg.n_heads)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """transformers' ``T5Attention._relative_position_bucket`` on ``relative = key - query``."""
        num_buckets = self.num_buckets
        buckets = torch.zeros_like(relative)
        if self.bidirectional:
            num_buckets //= 2
            buckets = buckets + (relative > 0).long() * num_buckets
            relative = relative.abs()
        else:
            relative = (-relative).clamp(min=0)
        max_exact = num_buckets // 2
        scaled = torch.log(relative.float().clamp(min=1) / max_exact) / math.log(self.max_distance / max_exact)
        large = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
        return buckets + torch.where(relative < max_exact, relative, large)

    def bias(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.table.weight[self.bucket(k - q), h]


def make_score_bias(cfg: ModelConfig, causal: bool) -> nn.Module | None:
    """The score-bias module of a stack (None for encodings that do not act on scores)."""
    if cfg.pos == Pos.alibi:
        return Alibi(cfg)
    if cfg.pos == Pos.t5_bias:
        return T5Bias(cfg, bidirectional=not causal)
    return None
