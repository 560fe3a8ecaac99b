"""Shared by the model tests: tiny Tessera configs, and tiny randomly initialised transformers
models built locally from configs (no download)."""

import torch

from model import ModelConfig

TINY = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 32}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**TINY, **overrides})


SPECS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=500.0)),
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False, rope_theta=500.0, sliding_window=5)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=5, num_experts_per_tok=3, norm_topk_prob=False, max_position_embeddings=64,
        tie_word_embeddings=True, rope_theta=500.0)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=500.0)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=500.0)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
    "bert": ("BertForMaskedLM", "BertConfig", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)),
}


def hf_model(name: str, seed: int = 0, std: float = 0.15):
    """A transformers model with every weight drawn at random (norms around 1), in eval mode."""
    import transformers

    class_name, config_name, kwargs = SPECS[name]
    model = getattr(transformers, class_name)(getattr(transformers, config_name)(**kwargs)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_weight = param.ndim == 1 and ("norm" in pname.lower() or "ln_" in pname) and pname.endswith(
                "weight")
            param.copy_(1.0 + noise if is_norm_weight else noise)
    return model


def hf_logits(model, ids, mask=None, dec_ids=None):
    with torch.no_grad():
        if dec_ids is not None:
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        return model(input_ids=ids, attention_mask=mask).logits


def seeded(cfg: ModelConfig, head: str = "lm", seed: int = 0):
    """``build_model`` with weights from ``seed``: equal weights for equal shapes, whatever the backend."""
    from model import build_model

    model = build_model(cfg, head)
    model.init_weights(seed)
    return model
