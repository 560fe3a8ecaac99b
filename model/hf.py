"""Hugging Face interop: LlamaForCausalLM, GPT2LMHeadModel, BertForMaskedLM, T5ForConditionalGeneration,
Qwen3ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM.

Pure tensor mapping (no transformers import): each layout is a :class:`Layout` that translates
``config.json`` to a ``ModelConfig`` and back, and lists which HF tensors make each Tessera tensor
(several HF tensors concatenate into one fused Tessera tensor: q/k/v → qkv, gate/up → up; the
per-expert tensors of the checkpoint format stack into one [E, ...] tensor per MoE layer).

MoE: the router's load-balancing coefficient is carried over as it is, but transformers' loss
(over all layers at once, and k at balance) is not Tessera's (per layer, summed; 1 at balance).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from common.errors import UserError
from model.config import Arch, Mlp, ModelConfig, Norm, NormPosition, Pos, RouterGating
from model.lazy_weights import LazyTensor

# (tessera name, HF names concatenated along dim 0, transpose each HF tensor: GPT-2 Conv1D)
Entry = tuple[str, tuple[str, ...], bool]


@dataclasses.dataclass(frozen=True)
class Layout:
    """One transformers model class: its config translation and its tensor map."""

    architecture: str
    model_type: str
    embedding_tensor: str
    head_tensor: str  # tied when absent or equal to the embeddings
    requires: dict[str, Any]  # ModelConfig values this layout can represent
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    entries: Callable[[ModelConfig], list[Entry]]


def _linear(ours: str, hf: str, bias: bool, *, parts: tuple[str, ...] = ("",), transpose: bool = False) -> list[Entry]:
    """Weight (and bias) entries of a linear layer made of HF linears ``hf + part`` for each part."""
    out = [(f"{ours}.weight", tuple(f"{hf}{p}.weight" for p in parts), transpose)]
    if bias:
        out.append((f"{ours}.bias", tuple(f"{hf}{p}.bias" for p in parts), False))
    return out


def _norm(ours: str, hf: str, bias: bool) -> list[Entry]:
    return _linear(ours, hf, bias)


def _require_equal(hf: dict[str, Any], key: str, expected: Any, what: str) -> None:
    if key in hf and hf[key] != expected:
        raise UserError(f"config.json: {key}={hf[key]!r} is not supported ({what})")


def _head_dim_check(hf: dict[str, Any], d_model: int, n_heads: int, key: str) -> None:
    if hf.get(key) not in (None, d_model // n_heads) or d_model % n_heads:
        raise UserError(f"config.json: {key}={hf.get(key)} differs from hidden size / heads; not supported")


# --- Llama -------------------------------------------------------------------------------------

def _llama_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"config.json: rope scaling {rope_type!r} is not supported (default and llama3 are)")
    scaling = {} if rope_type == "default" else {
        "rope_scaling_factor": rope["factor"], "rope_low_freq_factor": rope["low_freq_factor"],
        "rope_high_freq_factor": rope["high_freq_factor"],
        "rope_original_max_seq_len": rope["original_max_position_embeddings"],
    }
    _require_equal(hf, "hidden_act", "silu", "Llama MLP must be SwiGLU")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise UserError("config.json: attention_bias and mlp_bias differ; Tessera has one bias switch")
    head_dim = hf.get("head_dim")
    implied = hf["hidden_size"] // hf["num_attention_heads"]
    explicit = head_dim is not None and (head_dim != implied or hf["hidden_size"] % hf["num_attention_heads"])
    return {
        "attn_head_dim": head_dim if explicit else None,
        "arch": "decoder", "pos": "rope", "norm": "rmsnorm", "norm_position": "pre", "mlp": "swiglu",
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
        "d_ff": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "bias": hf.get("attention_bias", False), **scaling,
    }


def _llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": rope, "rope_scaling": rope,
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "pad_token_id": cfg.pad_token_id,
    }


def _llama_entries(cfg: ModelConfig, mlp: Callable[[str, str], list[Entry]] | None = None) -> list[Entry]:
    """Llama's tensors; ``mlp(ours, hf)`` gives a layer's MLP entries instead of the dense SwiGLU's."""
    out: list[Entry] = [("embed.tokens.weight", ("model.embed_tokens.weight",), False)]
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}", f"stack.layers.{i}"
        out += _linear(f"{us}.attn.qkv", f"{hf}.self_attn.", cfg.bias or cfg.qkv_bias,
                       parts=("q_proj", "k_proj", "v_proj"))
        out += _linear(f"{us}.attn.out", f"{hf}.self_attn.o_proj", cfg.bias)
        if mlp is not None:
            out += mlp(f"{us}.mlp", hf)
        else:
            out += _linear(f"{us}.mlp.up", f"{hf}.mlp.", cfg.bias, parts=("gate_proj", "up_proj"))
            out += _linear(f"{us}.mlp.down", f"{hf}.mlp.down_proj", cfg.bias)
        if cfg.qk_norm:
            out += _norm(f"{us}.attn.q_norm", f"{hf}.self_attn.q_norm", False)
            out += _norm(f"{us}.attn.k_norm", f"{hf}.self_attn.k_norm", False)
        out += _norm(f"{us}.attn_norm", f"{hf}.input_layernorm", False)
        out += _norm(f"{us}.mlp_norm", f"{hf}.post_attention_layernorm", False)
    out += _norm("stack.final_norm", "model.norm", False)
    return out


def _qwen3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    _require_equal(hf, "use_sliding_window", False, "per-layer sliding windows")
    return {**_llama_from_hf(hf), "qk_norm": True}


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_llama_to_hf(cfg), "use_sliding_window": False}


# --- Mixtral and Qwen2-MoE (Llama attention, MoE MLPs) -----------------------------------------

EXPERT_TENSORS = (".experts.up", ".experts.down")  # stacked [E, rows, cols]: one HF tensor per expert (and part)


def _experts(ours: str, hf: str, cfg: ModelConfig, gate: str, up: str, down: str) -> list[Entry]:
    """The stacked expert tensors from HF's ``{hf}.{e}.{gate|up|down}.weight`` (the checkpoint format)."""
    experts = range(cfg.n_experts)
    return [(f"{ours}.up", tuple(f"{hf}.{e}.{part}.weight" for e in experts for part in (gate, up)), False),
            (f"{ours}.down", tuple(f"{hf}.{e}.{down}.weight" for e in experts), False)]


def _moe_from_hf(hf: dict[str, Any], n_experts_key: str) -> dict[str, Any]:
    """Llama's keys plus the router's; ``d_ff`` (dense) stays as given, experts get ``moe_d_ff``."""
    raw = _llama_from_hf({**hf, "attention_bias": False, "mlp_bias": False})
    n_experts = hf.get(n_experts_key, hf.get("num_local_experts"))  # transformers 5 may save either name
    if n_experts is None:
        raise UserError(f"config.json: missing key {n_experts_key!r}")
    raw.update(n_experts=n_experts, experts_per_token=hf["num_experts_per_tok"], router_gating="softmax",
               router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), router_z_loss_coef=0.0)
    return raw


def _moe_to_hf(cfg: ModelConfig, n_experts_key: str) -> dict[str, Any]:
    out = _llama_to_hf(cfg)
    for key in ("attention_bias", "mlp_bias"):
        del out[key]
    return {**out, n_experts_key: cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False}


def _mixtral_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    raw = _moe_from_hf(hf, "num_local_experts")
    _require_equal(hf, "router_jitter_noise", 0.0, "router jitter")
    return {**raw, "moe_d_ff": hf["intermediate_size"], "router_norm_topk": True,
            "sliding_window": hf.get("sliding_window")}


def _mixtral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_moe_to_hf(cfg, "num_local_experts"), "intermediate_size": cfg.expert_d_ff,
            "sliding_window": cfg.sliding_window, "router_jitter_noise": 0.0}


def _mixtral_entries(cfg: ModelConfig) -> list[Entry]:
    def mlp(ours: str, hf: str) -> list[Entry]:
        moe = f"{hf}.block_sparse_moe"
        return [(f"{ours}.router.weight", (f"{moe}.gate.weight",), False),
                *_experts(f"{ours}.experts", f"{moe}.experts", cfg, "w1", "w3", "w2")]

    return _llama_entries(cfg, mlp)


def _every_layer_sparse(hf: dict[str, Any]) -> None:
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise UserError("config.json: mlp_only_layers / decoder_sparse_step (dense layers among MoE ones) "
                        "are not supported; every layer must be sparse")
    _require_equal(hf, "use_sliding_window", False, "per-layer sliding windows")


def _qwen2_moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    _every_layer_sparse(hf)
    if not hf.get("shared_expert_intermediate_size"):
        raise UserError("config.json: shared_expert_intermediate_size must be > 0 (Qwen2-MoE's shared expert)")
    raw = _moe_from_hf(hf, "num_experts")
    return {**raw, "moe_d_ff": hf["moe_intermediate_size"], "router_norm_topk": hf.get("norm_topk_prob", False),
            "shared_expert_d_ff": hf["shared_expert_intermediate_size"], "shared_expert_gate": True,
            "qkv_bias": hf.get("qkv_bias", True)}


def _qwen2_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_moe_to_hf(cfg, "num_experts"), "moe_intermediate_size": cfg.expert_d_ff,
            "shared_expert_intermediate_size": cfg.shared_expert_d_ff, "norm_topk_prob": cfg.router_norm_topk,
            "qkv_bias": cfg.qkv_bias, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "use_sliding_window": False}


def _qwen3_moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    _every_layer_sparse(hf)
    _require_equal(hf, "attention_bias", False, "MoE models have no biases")
    return {**_moe_from_hf(hf, "num_experts"), "moe_d_ff": hf["moe_intermediate_size"],
            "router_norm_topk": hf.get("norm_topk_prob", False), "qk_norm": True}


def _qwen3_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_moe_to_hf(cfg, "num_experts"), "moe_intermediate_size": cfg.expert_d_ff,
            "norm_topk_prob": cfg.router_norm_topk, "attention_bias": False, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": False}


def _qwen3_moe_entries(cfg: ModelConfig) -> list[Entry]:
    def mlp(ours: str, hf: str) -> list[Entry]:
        return [(f"{ours}.router.weight", (f"{hf}.mlp.gate.weight",), False),
                *_experts(f"{ours}.experts", f"{hf}.mlp.experts", cfg, "gate_proj", "up_proj", "down_proj")]

    return _llama_entries(cfg, mlp)


def _qwen2_moe_entries(cfg: ModelConfig) -> list[Entry]:
    def mlp(ours: str, hf: str) -> list[Entry]:
        moe = f"{hf}.mlp"
        return [(f"{ours}.router.weight", (f"{moe}.gate.weight",), False),
                *_experts(f"{ours}.experts", f"{moe}.experts", cfg, "gate_proj", "up_proj", "down_proj"),
                *_linear(f"{ours}.shared.up", f"{moe}.shared_expert.", False, parts=("gate_proj", "up_proj")),
                *_linear(f"{ours}.shared.down", f"{moe}.shared_expert.down_proj", False),
                *_linear(f"{ours}.shared_gate", f"{moe}.shared_expert_gate", False)]

    return _llama_entries(cfg, mlp)


# --- GPT-2 -------------------------------------------------------------------------------------

_GELU = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


def _gelu_tanh(hf: dict[str, Any], key: str) -> bool:
    act = hf.get(key, "gelu")
    if act not in _GELU:
        raise UserError(f"config.json: {key}={act!r} is not supported; choose from {', '.join(_GELU)}")
    return _GELU[act]


def _gpt2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    _require_equal(hf, "scale_attn_by_inverse_layer_idx", False, "per-layer attention scaling")
    d_model = hf["n_embd"]
    return {
        "arch": "decoder", "pos": "learned", "norm": "layernorm", "norm_position": "pre", "mlp": "gelu",
        "bias": True, "gelu_tanh": _gelu_tanh(hf, "activation_function"), "vocab_size": hf["vocab_size"],
        "d_model": d_model, "n_layers": hf["n_layer"], "n_heads": hf["n_head"],
        "d_ff": hf.get("n_inner") or 4 * d_model, "max_seq_len": hf["n_positions"],
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
    }


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": "gelu_new" if cfg.gelu_tanh else "gelu", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "bos_token_id": None, "eos_token_id": None,
    }


def _gpt2_entries(cfg: ModelConfig) -> list[Entry]:
    out: list[Entry] = [("embed.tokens.weight", ("transformer.wte.weight",), False),
                        ("embed.positions.table.weight", ("transformer.wpe.weight",), False)]
    for i in range(cfg.n_layers):
        hf, us = f"transformer.h.{i}", f"stack.layers.{i}"
        out += _linear(f"{us}.attn.qkv", f"{hf}.attn.c_attn", True, transpose=True)
        out += _linear(f"{us}.attn.out", f"{hf}.attn.c_proj", True, transpose=True)
        out += _linear(f"{us}.mlp.up", f"{hf}.mlp.c_fc", True, transpose=True)
        out += _linear(f"{us}.mlp.down", f"{hf}.mlp.c_proj", True, transpose=True)
        out += _norm(f"{us}.attn_norm", f"{hf}.ln_1", True)
        out += _norm(f"{us}.mlp_norm", f"{hf}.ln_2", True)
    out += _norm("stack.final_norm", "transformer.ln_f", True)
    return out


# --- BERT --------------------------------------------------------------------------------------

def _bert_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    _require_equal(hf, "position_embedding_type", "absolute", "only absolute positions")
    return {
        "arch": "encoder", "pos": "learned", "norm": "layernorm", "norm_position": "post", "mlp": "gelu",
        "bias": True, "gelu_tanh": _gelu_tanh(hf, "hidden_act"), "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
        "d_ff": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 512),
        "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "pad_token_id": hf.get("pad_token_id") or 0,
    }


def _bert_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu_new" if cfg.gelu_tanh else "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": 2,
        "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
    }


def _bert_entries(cfg: ModelConfig) -> list[Entry]:
    emb = "bert.embeddings"
    out: list[Entry] = [("embed.tokens.weight", (f"{emb}.word_embeddings.weight",), False),
                        ("embed.positions.table.weight", (f"{emb}.position_embeddings.weight",), False)]
    out += _norm("embed.norm", f"{emb}.LayerNorm", True)
    for i in range(cfg.n_layers):
        hf, us = f"bert.encoder.layer.{i}", f"stack.layers.{i}"
        out += _linear(f"{us}.attn.qkv", f"{hf}.attention.self.", True, parts=("query", "key", "value"))
        out += _linear(f"{us}.attn.out", f"{hf}.attention.output.dense", True)
        out += _norm(f"{us}.attn_norm", f"{hf}.attention.output.LayerNorm", True)
        out += _linear(f"{us}.mlp.up", f"{hf}.intermediate.dense", True)
        out += _linear(f"{us}.mlp.down", f"{hf}.output.dense", True)
        out += _norm(f"{us}.mlp_norm", f"{hf}.output.LayerNorm", True)
    out += _linear("head.transform.0", "cls.predictions.transform.dense", True)
    out += _norm("head.transform.2", "cls.predictions.transform.LayerNorm", True)
    out.append(("head.bias", ("cls.predictions.bias",), False))
    return out


# --- T5 ----------------------------------------------------------------------------------------

def _t5_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("gated-gelu", "gated-gelu_new"):
        raise UserError(f"config.json: feed_forward_proj={proj!r} is not supported (T5 v1.1 'gated-gelu' only)")
    _head_dim_check(hf, hf["d_model"], hf["num_heads"], "d_kv")
    # transformers 5 ties lm_head to the shared embeddings unless the checkpoint holds a different
    # lm_head, and keeps the old meaning of tie_word_embeddings=False as "do not scale"
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return {
        "arch": "encoder_decoder", "pos": "t5_bias", "norm": "rmsnorm", "norm_position": "pre", "mlp": "geglu",
        "gelu_tanh": True, "bias": False, "attn_scale": 1.0, "vocab_size": hf["vocab_size"],
        "d_model": hf["d_model"], "n_layers": hf["num_layers"],
        "n_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"], "n_heads": hf["num_heads"],
        "d_ff": hf["d_ff"], "t5_num_buckets": hf.get("relative_attention_num_buckets", 32),
        "t5_max_distance": hf.get("relative_attention_max_distance", 128),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-6),
        "scale_output": bool(scale), "pad_token_id": hf.get("pad_token_id") or 0, "init_scheme": "t5",
    }


def _t5_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers, "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.t5_num_buckets, "relative_attention_max_distance": cfg.t5_max_distance,
        "dropout_rate": 0.0, "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": cfg.scale_output,  # transformers reads it as "scale the decoder outputs"
        "is_encoder_decoder": True, "pad_token_id": cfg.pad_token_id, "decoder_start_token_id": cfg.pad_token_id,
        "eos_token_id": 1,
    }


def _t5_entries(cfg: ModelConfig) -> list[Entry]:
    out: list[Entry] = [("embed.tokens.weight", ("shared.weight",), False)]
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        out.append((f"{stack}.score_bias.table.weight",
                    (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), False))
        for i in range(n_layers):
            hf, us = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            out += _linear(f"{us}.attn.qkv", f"{hf}.0.SelfAttention.", False, parts=("q", "k", "v"))
            out += _linear(f"{us}.attn.out", f"{hf}.0.SelfAttention.o", False)
            out += _norm(f"{us}.attn_norm", f"{hf}.0.layer_norm", False)
            mlp = f"{hf}.{2 if stack == 'decoder' else 1}"
            if stack == "decoder":
                out += _linear(f"{us}.cross_attn.q", f"{hf}.1.EncDecAttention.q", False)
                out += _linear(f"{us}.cross_attn.kv", f"{hf}.1.EncDecAttention.", False, parts=("k", "v"))
                out += _linear(f"{us}.cross_attn.out", f"{hf}.1.EncDecAttention.o", False)
                out += _norm(f"{us}.cross_norm", f"{hf}.1.layer_norm", False)
            out += _linear(f"{us}.mlp.up", f"{mlp}.DenseReluDense.", False, parts=("wi_0", "wi_1"))
            out += _linear(f"{us}.mlp.down", f"{mlp}.DenseReluDense.wo", False)
            out += _norm(f"{us}.mlp_norm", f"{mlp}.layer_norm", False)
        out += _norm(f"{stack}.final_norm", f"{stack}.final_layer_norm", False)
    return out


_DENSE = {"n_experts": 0, "qkv_bias": False, "qk_norm": False}
_COMMON = {"attn_scale": None, "sliding_window": None, "scale_output": False, **_DENSE}
_STANDARD_HEADS = {"attn_head_dim": None}  # layouts whose head size is always d_model / n_heads
_SINGLE_KV = {"n_kv_heads": "n_heads"}  # marker: these layouts have no grouped KV heads
_MOE = "> 0"  # marker: n_experts > 0
_LLAMA_SHAPE = {"arch": Arch.decoder, "pos": Pos.rope, "norm": Norm.rmsnorm, "norm_position": NormPosition.pre,
                "mlp": Mlp.swiglu, "bias": False, "attn_scale": None, "scale_output": False, "n_experts": _MOE,
                "router_gating": RouterGating.softmax, "moe_capacity_factor": None, "qk_norm": False,
                "router_bias_update_rate": 0.0}

LAYOUTS: dict[str, Layout] = {
    "llama": Layout("LlamaForCausalLM", "llama", "model.embed_tokens.weight", "lm_head.weight",
                    {**_COMMON, "arch": Arch.decoder, "pos": Pos.rope, "norm": Norm.rmsnorm,
                     "norm_position": NormPosition.pre, "mlp": Mlp.swiglu},
                    _llama_from_hf, _llama_to_hf, _llama_entries),
    "gpt2": Layout("GPT2LMHeadModel", "gpt2", "transformer.wte.weight", "lm_head.weight",
                   {**_COMMON, **_SINGLE_KV, **_STANDARD_HEADS, "arch": Arch.decoder, "pos": Pos.learned,
                    "norm": Norm.layernorm,
                    "norm_position": NormPosition.pre, "mlp": Mlp.gelu, "bias": True},
                   _gpt2_from_hf, _gpt2_to_hf, _gpt2_entries),
    "bert": Layout("BertForMaskedLM", "bert", "bert.embeddings.word_embeddings.weight",
                   "cls.predictions.decoder.weight",
                   {**_COMMON, **_SINGLE_KV, **_STANDARD_HEADS, "arch": Arch.encoder, "pos": Pos.learned,
                    "norm": Norm.layernorm,
                    "norm_position": NormPosition.post, "mlp": Mlp.gelu, "bias": True},
                   _bert_from_hf, _bert_to_hf, _bert_entries),
    "t5": Layout("T5ForConditionalGeneration", "t5", "shared.weight", "lm_head.weight",
                 {**_SINGLE_KV, **_DENSE, **_STANDARD_HEADS, "arch": Arch.encoder_decoder, "pos": Pos.t5_bias,
                  "norm": Norm.rmsnorm, "norm_position": NormPosition.pre, "mlp": Mlp.geglu, "bias": False,
                  "attn_scale": 1.0, "gelu_tanh": True, "sliding_window": None},
                 _t5_from_hf, _t5_to_hf, _t5_entries),
    "mixtral": Layout("MixtralForCausalLM", "mixtral", "model.embed_tokens.weight", "lm_head.weight",
                      {**_LLAMA_SHAPE, "qkv_bias": False, "router_norm_topk": True, "shared_expert_d_ff": 0},
                      _mixtral_from_hf, _mixtral_to_hf, _mixtral_entries),
    "qwen2_moe": Layout("Qwen2MoeForCausalLM", "qwen2_moe", "model.embed_tokens.weight", "lm_head.weight",
                        {**_LLAMA_SHAPE, "sliding_window": None, "shared_expert_gate": True},
                        _qwen2_moe_from_hf, _qwen2_moe_to_hf, _qwen2_moe_entries),
    "qwen3": Layout("Qwen3ForCausalLM", "qwen3", "model.embed_tokens.weight", "lm_head.weight",
                    {**_COMMON, "qk_norm": True, "arch": Arch.decoder, "pos": Pos.rope, "norm": Norm.rmsnorm,
                     "norm_position": NormPosition.pre, "mlp": Mlp.swiglu},
                    _qwen3_from_hf, _qwen3_to_hf, _llama_entries),
    "qwen3_moe": Layout("Qwen3MoeForCausalLM", "qwen3_moe", "model.embed_tokens.weight", "lm_head.weight",
                        {**_LLAMA_SHAPE, "qk_norm": True, "qkv_bias": False, "sliding_window": None,
                         "shared_expert_d_ff": 0},
                        _qwen3_moe_from_hf, _qwen3_moe_to_hf, _qwen3_moe_entries),
}


def layout_for_hf(hf_config: dict[str, Any]) -> Layout:
    """The layout of a transformers ``config.json`` (by ``model_type``)."""
    model_type = hf_config.get("model_type")
    if model_type not in LAYOUTS:
        raise UserError(f"config.json: model_type {model_type!r} is not supported; "
                        f"Tessera imports {', '.join(LAYOUTS)}")
    return LAYOUTS[model_type]


def layout_for(cfg: ModelConfig) -> Layout:
    """The transformers layout that represents ``cfg`` exactly (UserError when none does)."""
    reasons = []
    for name, layout in LAYOUTS.items():
        bad = [key for key, value in layout.requires.items() if not _satisfies(cfg, key, value)]
        if not bad:
            return layout
        reasons.append(f"{name} needs {', '.join(f'{k}={_show(layout.requires[k])}' for k in bad)}")
    raise UserError("no Hugging Face layout represents this model: " + "; ".join(reasons))


def _satisfies(cfg: ModelConfig, key: str, value: Any) -> bool:
    if value == "n_heads":
        return cfg.kv_heads == cfg.n_heads
    if value == _MOE:
        return getattr(cfg, key) > 0
    return getattr(cfg, key) == value


def _show(value: Any) -> str:
    return value if value in ("n_heads", _MOE) else str(getattr(value, "value", value))


def config_from_hf(hf_config: dict[str, Any], tensors: dict[str, LazyTensor]) -> ModelConfig:
    """A ``ModelConfig`` equivalent to a transformers ``config.json`` and its tensors (which say
    whether the LM head is tied: absent, or equal to the embeddings)."""
    layout = layout_for_hf(hf_config)
    try:
        raw = layout.config_from_hf(hf_config)
    except KeyError as exc:
        raise UserError(f"config.json: missing key {exc.args[0]!r}") from None
    tensors = _normalise_hf_names(tensors, layout)
    head, embedding = tensors.get(layout.head_tensor), tensors.get(layout.embedding_tensor)
    raw["tie_embeddings"] = (head is None or embedding is None
                             or (head.shape == embedding.shape and torch.equal(head.load(), embedding.load())))
    return ModelConfig.from_dict({k: v for k, v in raw.items() if v is not None}, "config.json")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers ``config.json`` mapping for ``cfg``."""
    layout = layout_for(cfg)
    return {"architectures": [layout.architecture], "model_type": layout.model_type, "dtype": "float32",
            "tie_word_embeddings": cfg.tie_embeddings, **layout.config_to_hf(cfg)}


def _entries(layout: Layout, cfg: ModelConfig) -> list[Entry]:
    entries = layout.entries(cfg)
    if not cfg.tie_embeddings:
        entries.append(("head.weight", (layout.head_tensor,), False))
    return entries


def state_from_hf(tensors: dict[str, LazyTensor], cfg: ModelConfig) -> dict[str, LazyTensor]:
    """Tessera state dict from HF tensors (the model's ``model.safetensors`` contents), each converted
    when it is read."""
    layout = layout_for(cfg)
    tensors = _normalise_hf_names(tensors, layout)
    state = {}
    for ours, names, transpose in _entries(layout, cfg):
        missing = [n for n in names if n not in tensors]
        if missing:
            raise UserError(f"model.safetensors: tensor {missing[0]!r} is missing for a {layout.architecture}")
        state[ours] = _converted([tensors[n] for n in names], transpose,
                                 cfg.n_experts if ours.endswith(EXPERT_TENSORS) else 0)
    token_types = tensors.get("bert.embeddings.token_type_embeddings.weight")
    if layout.model_type == "bert" and token_types is not None:
        # Tessera has no token types: token type 0 (what every single-segment input uses) is folded in
        positions = state["embed.positions.table.weight"]
        state["embed.positions.table.weight"] = LazyTensor(positions.shape,
                                                           lambda: positions.load() + token_types.load()[0])
    return state


def _converted(parts: list[LazyTensor], transpose: bool, experts: int = 0) -> LazyTensor:
    """HF tensors as one of ours: each transposed (Conv1D), then concatenated (fused q/k/v, gate/up),
    then, for ``experts`` > 0, viewed as [experts, rows, cols] (the stacked experts of an MoE layer)."""
    shapes = [p.shape[::-1] if transpose else p.shape for p in parts]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    if experts:
        shape = (experts, shape[0] // experts, *shape[1:])

    def load() -> torch.Tensor:
        tensors = [p.load().t() if transpose else p.load() for p in parts]
        return (torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]).reshape(shape)

    return LazyTensor(shape, load)


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors from a Tessera state dict: fused tensors split, Conv1D weights transposed, a tied
    head written out as a copy of the embeddings (transformers re-ties equal tensors)."""
    layout = layout_for(cfg)
    out: dict[str, torch.Tensor] = {}
    for ours, names, transpose in _entries(layout, cfg):
        tensor = state[ours]
        if ours.endswith(EXPERT_TENSORS):  # [E, rows, cols]: rows of every expert (and part) in turn
            tensor = tensor.flatten(0, 1)
            parts = tensor.chunk(len(names))
        else:
            parts = torch.split(tensor, _split_sizes(names, tensor.shape[0], cfg), dim=0)
        for name, part in zip(names, parts):
            out[name] = (part.t() if transpose else part).contiguous().clone()
    if cfg.tie_embeddings:
        out[layout.head_tensor] = out[layout.embedding_tensor].clone()
    if layout.model_type == "bert":
        dtype = out[layout.embedding_tensor].dtype
        out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(2, cfg.d_model, dtype=dtype)
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    return out


def _split_sizes(names: tuple[str, ...], total: int, cfg: ModelConfig) -> list[int]:
    if len(names) == 3:  # q, k, v
        kv = cfg.kv_heads * cfg.head_dim
        return [total - 2 * kv, kv, kv]
    return [total // len(names)] * len(names)


def _normalise_hf_names(tensors: dict[str, LazyTensor], layout: Layout) -> dict[str, LazyTensor]:
    """Accept the prefix-less names of older GPT-2 checkpoints (``h.0.attn...`` for ``transformer.h.0...``)."""
    if layout.model_type == "gpt2" and "transformer.wte.weight" not in tensors:
        return {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in tensors.items()}
    return tensors


# --- LoRA adapters (PEFT's layout) -------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class HFAdapter:
    """A LoRA adapter in PEFT's names: tensors ``base_model.model.<module>.lora_A/B.weight``, and the
    rank of each module (several of our parts in one HF module, GPT-2's c_attn, add up their ranks)."""

    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]


def adapter_to_hf(adapter: dict[str, torch.Tensor], cfg: ModelConfig) -> HFAdapter:
    """PEFT tensors for Tessera adapter tensors (``<linear>.lora.<part>.A/B``). Each HF module takes the
    parts whose rows it holds: one part maps to it as it is; several (q, k, v into one c_attn) stack
    their A's and place their B's block-diagonally, zero for rows no part adapts, which is exact."""
    from model.lora import linear_parts, part_rows

    layout = layout_for(cfg)
    hf_names = {ours: (names, transpose) for ours, names, transpose in _entries(layout, cfg)}
    parts_of = linear_parts(cfg)
    by_linear: dict[str, list[str]] = {}
    for key in adapter:
        if key.endswith(".A"):
            linear, part = key[: -len(".A")].rsplit(".lora.", 1)
            by_linear.setdefault(linear, []).append(part)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for linear, adapted in by_linear.items():
        rows = part_rows(parts_of[".".join(linear.split(".")[-2:])])
        names, _ = hf_names[f"{linear}.weight"]
        total = max(r.stop for r in rows.values())
        start = 0
        for name, size in zip(names, _split_sizes(names, total, cfg)):
            inside = [p for p in adapted if start <= rows[p].start and rows[p].stop <= start + size]
            if inside:
                a = torch.cat([adapter[f"{linear}.lora.{p}.A"] for p in inside])
                b = torch.zeros(size, a.shape[0], dtype=a.dtype)
                col = 0
                for p in inside:
                    part_b = adapter[f"{linear}.lora.{p}.B"]
                    b[rows[p].start - start:rows[p].stop - start, col:col + part_b.shape[1]] = part_b
                    col += part_b.shape[1]
                module = name[: -len(".weight")]
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
                ranks[module] = a.shape[0]
            start += size
    return HFAdapter(tensors, ranks)


def adapter_from_hf(tensors: dict[str, torch.Tensor], peft_config: dict[str, Any], cfg: ModelConfig
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tessera adapter tensors and the ``lora`` section for a PEFT LoRA adapter (its
    ``adapter_model.safetensors`` tensors and ``adapter_config.json``) of a model of ``cfg``.

    Every part of an HF module takes the module's A and its rows of B, which is exact. Tessera has one
    rank and one scaling for all sites: modules of a smaller rank (``rank_pattern``) are padded with zero
    rows of A and columns of B, and a module's own scaling (``alpha_pattern``) is folded into its B."""
    import math
    import re

    from model.lora import linear_parts, part_rows

    if peft_config.get("peft_type") != "LORA":
        raise UserError(f"adapter_config.json: peft_type {peft_config.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices"):
        if peft_config.get(key):
            raise UserError(f"adapter_config.json: {key} is not supported by Tessera's LoRA")
    layout = layout_for(cfg)
    modules: dict[str, tuple[str, int, int]] = {}  # HF module -> (our linear, first row, rows)
    parts_of = linear_parts(cfg)
    for ours, names, _ in _entries(layout, cfg):
        linear = ours.removesuffix(".weight")
        if ".".join(linear.split(".")[-2:]) not in parts_of or not ours.endswith(".weight"):
            continue
        total = sum(rows for _, rows in parts_of[".".join(linear.split(".")[-2:])])
        start = 0
        for name, size in zip(names, _split_sizes(names, total, cfg)):
            modules[name.removesuffix(".weight")] = (linear, start, size)
            start += size
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.[^.]+)?\.weight", key)
        if match is None:
            if ".lora_B" not in key:
                raise UserError(f"adapter_model.safetensors: tensor {key!r} is not a LoRA A/B weight")
            continue
        module = match.group(1)
        if module not in modules:
            raise UserError(f"adapter_model.safetensors: {module!r} is not a projection Tessera adapts")
        b_key = key.replace(".lora_A", ".lora_B")
        if b_key not in tensors:
            raise UserError(f"adapter_model.safetensors: {b_key!r} is missing")
        found[module] = (tensors[key].float(), tensors[b_key].float())
    if not found:
        raise UserError("adapter_model.safetensors: no LoRA tensors found")
    rank, alpha, rslora = peft_config["r"], float(peft_config["lora_alpha"]), bool(peft_config.get("use_rslora"))

    def pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
        return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)

    def scaling(r: int, a: float) -> float:
        return a / (math.sqrt(r) if rslora else r)

    top = max(a.shape[0] for a, _ in found.values())
    ours_scaling = scaling(rank, alpha)
    state: dict[str, torch.Tensor] = {}
    sites = []
    for module, (a, b) in found.items():
        r = a.shape[0]
        own = scaling(pattern(peft_config.get("rank_pattern") or {}, module, rank),
                      pattern(peft_config.get("alpha_pattern") or {}, module, alpha))
        a = torch.cat([a, a.new_zeros(top - r, a.shape[1])])
        b = torch.cat([b * (own / ours_scaling), b.new_zeros(b.shape[0], top - r)], dim=1)
        linear, start, size = modules[module]
        for part, rows in part_rows(parts_of[".".join(linear.split(".")[-2:])]).items():
            if start <= rows.start and rows.stop <= start + size:
                state[f"{linear}.lora.{part}.A"] = a.clone()
                state[f"{linear}.lora.{part}.B"] = b[rows.start - start:rows.stop - start].contiguous()
                sites.append(f"{linear.rsplit('.', 1)[0]}.{part}")
    lora = {"rank": top, "alpha": ours_scaling * (math.sqrt(top) if rslora else top), "rslora": rslora,
            "dropout": float(peft_config.get("lora_dropout") or 0.0), "targets": sorted(sites)}
    return state, lora
