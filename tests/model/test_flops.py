import pytest
import torch

from model import ModelConfig, build_model
from model.flops import count_parameters, flops_per_token
from model.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_the_built_model(name):
    cfg = ModelConfig.from_dict({"preset": name})
    heads = ["lm"] if cfg.arch == "encoder_decoder" else ["lm", "classifier"]
    for head in heads:
        with torch.device("meta"):
            model = build_model(cfg, head)
        assert count_parameters(cfg, head=head) == sum(p.numel() for p in model.parameters())


def test_known_sizes_and_palm_flops():
    assert round(count_parameters(ModelConfig.from_dict({"preset": "gpt2-124m"})) / 1e6, 1) == 124.4
    llama3 = ModelConfig.from_dict({"preset": "llama3-8b"})
    assert round(count_parameters(llama3) / 1e9, 2) == 8.03
    cfg = ModelConfig.from_dict({"preset": "llama-1b"})
    n = count_parameters(cfg, include_embeddings=False) + cfg.vocab_size * cfg.d_model
    expected = 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 2048
    assert flops_per_token(cfg, 2048) == expected
    assert flops_per_token(cfg, 4096) > flops_per_token(cfg, 2048)


@pytest.mark.parametrize("overrides", [
    {"qk_norm": True, "attn_head_dim": 12},
    {"arch": "encoder_decoder", "pos": "t5_bias", "qk_norm": True, "qkv_bias": True},
    {"n_experts": 4, "experts_per_token": 2, "moe_d_ff": 24, "shared_expert_d_ff": 40, "shared_expert_gate": True},
])
def test_parameter_count_matches_for_head_sizes_norms_and_experts(overrides):
    cfg = ModelConfig.from_dict({"preset": "tiny-llama", **overrides})
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
