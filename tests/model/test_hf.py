import json

import pytest
import torch
from model_helpers import SPECS, hf_logits, hf_model, tiny

from common.errors import UserError
from model import build_model
from model.io import load_pretrained, save_hf


def ours_logits(model, ids, mask=None, dec_ids=None):
    with torch.no_grad():
        if dec_ids is not None:
            return model(ids, dec_ids, attention_mask=mask)
        return model(ids, attention_mask=mask)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_import_then_export_matches_transformers(name, tmp_path):
    import transformers

    reference = hf_model(name)
    reference.save_pretrained(tmp_path / "hf")
    ids = torch.randint(3, 96, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding: compared on real tokens
    dec_ids = torch.randint(3, 96, (2, 5)) if name == "t5" else None
    real = mask.bool() if dec_ids is None else torch.ones(2, 5, dtype=torch.bool)
    expected = hf_logits(reference, ids, mask, dec_ids)
    assert expected[real].std() > 0.1  # weights big enough for the comparison to mean something

    model = load_pretrained(tmp_path / "hf").eval()
    imported = ours_logits(model, ids, mask.bool(), dec_ids)
    assert (imported[real] - expected[real]).abs().max() <= 1e-4

    save_hf(model, tmp_path / "out")
    reloaded = getattr(transformers, SPECS[name][0]).from_pretrained(tmp_path / "out").eval()
    exported = hf_logits(reloaded, ids, mask, dec_ids)
    assert (exported[real] - imported[real]).abs().max() <= 1e-4


def test_sharded_checkpoints_import(tmp_path):
    reference = hf_model("llama")
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(3, 96, (1, 9))
    got = ours_logits(load_pretrained(tmp_path), ids)
    assert (got - hf_logits(reference, ids)).abs().max() <= 1e-4


def test_t5_with_tied_scaled_output_round_trips(tmp_path):
    import transformers

    model = build_model(tiny(arch="encoder_decoder", pos="t5_bias", mlp="geglu", gelu_tanh=True, norm="rmsnorm",
                             n_kv_heads=None, attn_scale=1.0, tie_embeddings=True, scale_output=True)).eval()
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "t5"
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, dec = torch.randint(1, 64, (2, 7)), torch.randint(1, 64, (2, 4))
    assert (hf_logits(reloaded, ids, None, dec) - ours_logits(model, ids, None, dec)).abs().max() <= 1e-4
    again = load_pretrained(tmp_path)
    assert again.config.tie_embeddings and again.config.scale_output


def test_config_without_a_matching_layout_is_refused(tmp_path):
    model = build_model(tiny(pos="alibi"))
    with pytest.raises(UserError, match="no Hugging Face layout represents this model: llama needs pos=rope"):
        save_hf(model, tmp_path)


def test_unsupported_hf_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="model_type 'mamba' is not supported"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(("overrides", "architecture"), [
    ({}, "MixtralForCausalLM"),
    ({"shared_expert_d_ff": 24, "shared_expert_gate": True, "qkv_bias": True, "router_norm_topk": False},
     "Qwen2MoeForCausalLM"),
])
def test_tessera_moe_models_export_to_the_matching_transformers_class(tmp_path, overrides, architecture):
    import transformers

    from model.io import load_pretrained

    cfg = tiny(n_experts=4, experts_per_token=2, moe_d_ff=16, init_std=0.2, tie_embeddings=False, **overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    reloaded = getattr(transformers, architecture).from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 64, (2, 9))
    ours = ours_logits(model, ids)
    assert ours.std() > 0.1
    assert (hf_logits(reloaded, ids) - ours).abs().max() <= 1e-4
    again = load_pretrained(tmp_path)
    for key in ("n_experts", "experts_per_token", "moe_d_ff", "shared_expert_d_ff", "router_norm_topk", "qkv_bias"):
        assert getattr(again.config, key) == getattr(cfg, key), key


def test_moe_without_a_matching_layout_is_refused(tmp_path):
    model = build_model(tiny(n_experts=4, router_gating="sigmoid"))
    with pytest.raises(UserError, match="mixtral needs router_gating=softmax"):
        save_hf(model, tmp_path)


def test_qwen2_moe_with_dense_layers_is_refused(tmp_path):
    reference = hf_model("qwen2_moe")
    reference.config.mlp_only_layers = [1]
    reference.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="mlp_only_layers"):
        load_pretrained(tmp_path)
