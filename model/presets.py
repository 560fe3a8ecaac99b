"""Named model shapes. A preset is a partial ``ModelConfig`` mapping; given keys override it.

The tiny-* presets (a few hundred thousand parameters) are for tests and demos; their vocab_size
is a default the trainer replaces with the tokenizer's size.
"""

from __future__ import annotations

from typing import Any

_GPT2 = {"arch": "decoder", "pos": "learned", "norm": "layernorm", "norm_eps": 1e-5, "norm_position": "pre",
         "mlp": "gelu", "gelu_tanh": True, "bias": True, "tie_embeddings": True}
_LLAMA = {"arch": "decoder", "pos": "rope", "norm": "rmsnorm", "norm_eps": 1e-5, "norm_position": "pre",
          "mlp": "swiglu", "bias": False}
_BERT = {"arch": "encoder", "pos": "learned", "norm": "layernorm", "norm_eps": 1e-12, "norm_position": "post",
         "mlp": "gelu", "gelu_tanh": False, "bias": True, "tie_embeddings": True}
_T5 = {"arch": "encoder_decoder", "pos": "t5_bias", "norm": "rmsnorm", "norm_eps": 1e-6, "norm_position": "pre",
       "mlp": "geglu", "gelu_tanh": True, "bias": False, "attn_scale": 1.0, "t5_num_buckets": 32,
       "t5_max_distance": 128, "init_scheme": "t5"}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": {**_GPT2, "vocab_size": 50257, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072,
                  "max_seq_len": 1024},
    "llama-125m": {**_LLAMA, "vocab_size": 32768, "d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4,
                   "d_ff": 2048, "max_seq_len": 2048, "tie_embeddings": False},
    "llama-1b": {**_LLAMA, "vocab_size": 32768, "d_model": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8,
                 "d_ff": 8192, "max_seq_len": 2048, "rope_theta": 500000.0, "tie_embeddings": True},
    "llama3-8b": {**_LLAMA, "vocab_size": 128256, "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                  "d_ff": 14336, "max_seq_len": 8192, "rope_theta": 500000.0, "tie_embeddings": False},
    "mixtral-8x7b": {**_LLAMA, "vocab_size": 32000, "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                     "d_ff": 14336, "max_seq_len": 32768, "rope_theta": 1e6, "tie_embeddings": False,
                     "n_experts": 8, "experts_per_token": 2, "router_aux_loss_coef": 0.02},
    "qwen1.5-moe-a2.7b": {**_LLAMA, "vocab_size": 151936, "d_model": 2048, "n_layers": 24, "n_heads": 16,
                          "d_ff": 5632, "moe_d_ff": 1408, "max_seq_len": 8192, "rope_theta": 1e6, "norm_eps": 1e-6,
                          "tie_embeddings": False, "qkv_bias": True, "n_experts": 60, "experts_per_token": 4,
                          "router_norm_topk": False, "shared_expert_d_ff": 5632, "shared_expert_gate": True,
                          "router_aux_loss_coef": 0.001},
    "bert-base": {**_BERT, "vocab_size": 30522, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072,
                  "max_seq_len": 512},
    "t5-base": {**_T5, "vocab_size": 32128, "d_model": 768, "n_layers": 12, "n_decoder_layers": 12, "n_heads": 12,
                "d_ff": 2048, "max_seq_len": 512, "tie_embeddings": False},
    "tiny-llama": {**_LLAMA, "vocab_size": 8192, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                   "d_ff": 176, "max_seq_len": 512, "tie_embeddings": True},
    "tiny-moe": {**_LLAMA, "vocab_size": 8192, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                 "d_ff": 176, "max_seq_len": 512, "tie_embeddings": True, "n_experts": 4, "experts_per_token": 2,
                 "moe_d_ff": 64, "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001},
    "tiny-gpt2": {**_GPT2, "vocab_size": 8192, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256,
                  "max_seq_len": 512},
    "tiny-bert": {**_BERT, "vocab_size": 8192, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256,
                  "max_seq_len": 512},
    "tiny-t5": {**_T5, "vocab_size": 8192, "d_model": 64, "n_layers": 2, "n_decoder_layers": 2, "n_heads": 4,
                "d_ff": 128, "max_seq_len": 512, "tie_embeddings": True, "scale_output": True},
}
