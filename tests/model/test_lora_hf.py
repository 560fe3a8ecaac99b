"""LoRA adapters exported in PEFT's layout: PEFT on the exported base gives Tessera's logits."""

import json

import pytest
import torch
from model_helpers import hf_model

from model.io import AdapterBase, load_pretrained, save_adapter, save_hf, save_peft_adapter, weights_sha256
from model.lora import LoraConfig, adapters_disabled, apply_lora, is_adapter_key, merge

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def randomise_adapters(model, seed: int = 1) -> None:
    """Nonzero B (and fresh A), so the adapter is far from the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def adapted(name: str, tmp_path, **lora):
    hf_model(name).save_pretrained(tmp_path / "source")
    model = load_pretrained(tmp_path / "source").eval()
    apply_lora(model, LoraConfig.from_dict({"rank": 4, "alpha": 8, **lora}, "lora"))
    randomise_adapters(model)
    return model


@pytest.mark.parametrize("name, lora", [
    ("llama", {"targets": ["all-linear"]}),
    ("llama", {"targets": ["q", "v", "gate", "layers.1.mlp.down"], "rslora": True}),
    ("gpt2", {"targets": ["all-linear"]}),
    ("gpt2", {"targets": ["q", "v", "layers.0.mlp.up"]}),  # two of c_attn's three parts
])
def test_peft_loads_the_exported_adapter(name, lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = adapted(name, tmp_path, **lora)
    with torch.no_grad():
        ours = model(IDS)
        with adapters_disabled(model):
            base_logits = model(IDS)
    save_hf(model, tmp_path / "base")
    save_peft_adapter(model, tmp_path / "adapter", tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft.eval()(input_ids=IDS).logits
        with peft.disable_adapter():
            plain = peft(input_ids=IDS).logits
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter matters
    assert (theirs - ours).abs().max() <= 1e-4
    assert (plain - base_logits).abs().max() <= 1e-4
    merge(model)
    with torch.no_grad():
        assert (model(IDS) - ours).abs().max() <= 1e-4


def test_a_merged_export_equals_the_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    model = adapted("llama", tmp_path, targets=["all-linear"])
    with torch.no_grad():
        ours = model(IDS)
    merge(model)
    save_hf(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(input_ids=IDS).logits - ours).abs().max() <= 1e-4


def test_an_adapter_directory_loads_on_its_base_and_refuses_a_changed_one(tmp_path):
    from common.errors import UserError

    model = adapted("gpt2", tmp_path, targets=["q", "v"])
    with torch.no_grad():
        ours = model(IDS)
    base = AdapterBase((tmp_path / "source").resolve(), weights_sha256(tmp_path / "source"))
    adapter = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
    save_adapter(adapter, model.lora_config, base, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    loaded = load_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS), ours)
    hf_model("gpt2", seed=5).save_pretrained(tmp_path / "source")  # the base changes under the adapter
    with pytest.raises(UserError, match="has changed since the adapter was trained") as error:
        load_pretrained(tmp_path / "adapter")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, targets, patterns", [
    ("llama", ["q_proj", "v_proj", "up_proj", "down_proj"], {"rank_pattern": {"model.layers.1.mlp.down_proj": 2},
                                                              "alpha_pattern": {"v_proj": 3.0}}),
    ("gpt2", ["c_attn", "c_fc"], {"rank_pattern": {"c_fc": 6}}),
])
def test_a_peft_adapter_made_by_others_imports(name, targets, patterns, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from launch.cli import main

    hf_model(name).save_pretrained(tmp_path / "base")
    peft = get_peft_model(hf_model(name), PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, **patterns))
    randomise_peft = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, param in peft.named_parameters():
            if "lora_" in key:
                param.copy_(torch.randn(param.shape, generator=randomise_peft) * 0.2)
        theirs = peft.eval()(input_ids=IDS).logits
    peft.save_pretrained(tmp_path / "adapter")
    assert main(["import", "--hf", str(tmp_path / "base"), "--peft", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "ours")]) == 0
    model = load_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        ours = model(IDS)
        with adapters_disabled(model):
            assert (model(IDS) - theirs).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-4
