"""Parameter counts and training FLOPs per token from a ``ModelConfig`` alone (no model built).

``flops_per_token`` follows PaLM (Chowdhery et al. 2022, appendix B): 6·N for the matmuls of the
forward and backward pass plus 12·L·H·Q·T for attention scores and values over a T-token context
(full, not halved for causality). N counts the parameters that take part in a matmul per token:
all non-embedding parameters plus the output projection (V·D, done whether tied or not); of a
Mixture-of-Experts MLP only the router, the experts_per_token experts a token visits and the
shared expert count (the active parameters).

Encoder-decoder: FLOPs per target token of a pair with source length = target length = seq_len;
the encoder's work on its seq_len tokens is charged to the seq_len target tokens, and L counts
encoder self-attention, decoder self-attention and decoder cross-attention layers.
"""

from __future__ import annotations

from model.config import Arch, Mlp, ModelConfig, Norm, NormPosition, Pos


def _norm(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == Norm.layernorm and cfg.bias else 1)


def _linear(cfg: ModelConfig, fan_in: int, fan_out: int, bias: bool | None = None) -> int:
    return fan_in * fan_out + (fan_out if (cfg.bias if bias is None else bias) else 0)


def _mlp(cfg: ModelConfig, d_ff: int) -> int:
    gated = 2 if cfg.mlp != Mlp.gelu else 1
    return _linear(cfg, cfg.d_model, gated * d_ff) + _linear(cfg, d_ff, cfg.d_model)


def _block(cfg: ModelConfig, cross: bool, active: bool) -> int:
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    q_proj, kv_proj = _linear(cfg, d, q, cfg.bias or cfg.qkv_bias), _linear(cfg, d, 2 * kv, cfg.bias or cfg.qkv_bias)
    attention = q_proj + kv_proj + _linear(cfg, q, d) + _norm(cfg) + 2 * cfg.head_dim * cfg.qk_norm
    if cfg.n_experts:
        experts = cfg.experts_per_token if active else cfg.n_experts
        mlp = d * cfg.n_experts + experts * _mlp(cfg, cfg.expert_d_ff) + d * cfg.shared_expert_gate
        mlp += _mlp(cfg, cfg.shared_expert_d_ff) if cfg.shared_expert_d_ff else 0
    else:
        mlp = _mlp(cfg, cfg.d_ff)
    return attention * (2 if cross else 1) + mlp + _norm(cfg)


def _stack(cfg: ModelConfig, n_layers: int, causal: bool, cross: bool, active: bool) -> int:
    total = n_layers * _block(cfg, cross, active)
    if cfg.norm_position == NormPosition.pre:
        total += _norm(cfg)
    if cfg.pos == Pos.t5_bias:
        total += cfg.t5_num_buckets * cfg.n_heads
    return total


def count_parameters(cfg: ModelConfig, include_embeddings: bool = True, head: str = "lm",
                     active: bool = False) -> int:
    """Parameters of ``build_model(cfg, head)``. Without embeddings: no token or learned position
    table and no untied output matrix (the V×D and T×D tables). ``active``: of MoE layers only
    what one token uses (router, experts_per_token experts, shared expert)."""
    total = _stack(cfg, cfg.n_layers, cfg.causal, cross=False, active=active)
    if cfg.arch == Arch.encoder_decoder:
        total += _stack(cfg, cfg.decoder_layers, True, cross=True, active=active)
    if cfg.norm_position == NormPosition.post:
        total += _norm(cfg)  # embedding norm
    if head == "classifier":
        total += _linear(cfg, cfg.d_model, cfg.n_labels)
    elif cfg.arch == Arch.encoder:
        total += _linear(cfg, cfg.d_model, cfg.d_model) + _norm(cfg) + cfg.vocab_size  # MLM transform + bias
    if include_embeddings:
        total += cfg.vocab_size * cfg.d_model
        if cfg.pos == Pos.learned:
            total += cfg.max_seq_len * cfg.d_model
        if head == "lm" and not cfg.tie_embeddings:
            total += cfg.vocab_size * cfg.d_model
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context ``seq_len``, PaLM style."""
    matmul_params = count_parameters(cfg, include_embeddings=False, active=True) + cfg.vocab_size * cfg.d_model
    attention_layers = cfg.n_layers + (2 * cfg.decoder_layers if cfg.arch == Arch.encoder_decoder else 0)
    return 6.0 * matmul_params + 12.0 * attention_layers * cfg.n_heads * cfg.head_dim * seq_len
