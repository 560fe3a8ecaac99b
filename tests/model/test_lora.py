"""LoRA adapters: sites and targets, step 0 equals the base, merge/unmerge, disabling, seeded init."""

import pytest
import torch
from model_helpers import seeded, tiny

from common.errors import ConfigError
from model import build_model
from model.lora import (
    LoraConfig,
    LoRALinear,
    adapter_sites,
    adapters_disabled,
    apply_lora,
    is_adapter_key,
    merge,
    merged_state,
    trainable_summary,
    unmerge,
)

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def lora(**raw) -> LoraConfig:
    return LoraConfig.from_dict({"rank": 4, **raw}, "lora")


def randomise_b(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def adapted(cfg=None, seed: int = 0, **raw):
    model = seeded(cfg or tiny(mlp="swiglu"), seed=seed).eval()
    return model, apply_lora(model, lora(**raw))


def test_sites_name_the_unfused_projections():
    model = seeded(tiny(mlp="swiglu"))
    names = set(adapter_sites(model))
    assert {"stack.layers.0.attn.q", "stack.layers.0.attn.k", "stack.layers.1.attn.o", "stack.layers.1.mlp.gate",
            "stack.layers.0.mlp.up", "stack.layers.0.mlp.down"} <= names
    t5 = seeded(tiny(preset="tiny-t5", vocab_size=64))
    assert "decoder.layers.0.cross_attn.k" in set(adapter_sites(t5))


@pytest.mark.parametrize("targets, expected", [
    (["q", "v"], {f"stack.layers.{i}.attn.{p}" for i in (0, 1) for p in "qv"}),
    (["layers.1.mlp.gate"], {"stack.layers.1.mlp.gate"}),
    (["stack.layers.*.attn.o"], {"stack.layers.0.attn.o", "stack.layers.1.attn.o"}),
])
def test_targets_pick_sites(targets, expected):
    _, sites = adapted(targets=targets)
    assert set(sites) == expected


def test_all_linear_adapts_every_site_and_freezes_the_base():
    model, sites = adapted(targets=["all-linear"])
    assert len(sites) == 2 * 7  # q k v o gate up down per layer
    for name, param in model.named_parameters():
        assert param.requires_grad == is_adapter_key(name), name
    trainable, total = trainable_summary(model)
    assert 0 < trainable < total


def test_step_zero_equals_the_base():
    base = seeded(tiny(mlp="swiglu")).eval()
    model, _ = adapted(targets=["all-linear"])
    assert torch.equal(model(IDS), base(IDS))
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if n.endswith(".A"))


def test_a_part_adapter_changes_only_its_rows():
    """q and v adapted in the fused qkv: k's rows of the output are the base's."""
    model, _ = adapted(targets=["q", "v"])
    randomise_b(model)
    layer = model.stack.layers[0].attn.qkv
    x = torch.randn(3, 32)
    out, base = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    q, kv = 32, 16
    assert torch.equal(out[:, q:q + kv], base[:, q:q + kv])
    expected_v = base[:, q + kv:] + layer.scaling * x @ layer.lora["v"].A.t() @ layer.lora["v"].B.t()
    torch.testing.assert_close(out[:, q + kv:], expected_v)
    assert not torch.allclose(out[:, :q], base[:, :q])


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(rslora):
    model, _ = adapted(targets=["all-linear"], rslora=rslora, alpha=8)
    randomise_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(IDS)
    state = merged_state(model.state_dict(), model.config, model.lora_config)
    merge(model)
    torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=1e-5)
    plain = build_model(model.config)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain.eval()(IDS), unmerged, rtol=0, atol=1e-5)
    unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_disabled_adapters_give_the_base():
    base = seeded(tiny(mlp="swiglu")).eval()
    model, _ = adapted(targets=["all-linear"])
    randomise_b(model)
    assert not torch.allclose(model(IDS), base(IDS))
    with adapters_disabled(model):
        assert torch.equal(model(IDS), base(IDS))
    assert not torch.allclose(model(IDS), base(IDS))


def test_meta_model_materialises_the_same_base_and_seeded_adapters():
    cfg = tiny(mlp="gelu")
    with torch.device("meta"):
        plain, first, second = build_model(cfg), build_model(cfg), build_model(cfg)
    for model in (first, second):
        apply_lora(model, lora(targets=["all-linear"]))
    for model in (plain, first, second):
        model.materialize("cpu", seed=3)
    states = [m.state_dict() for m in (plain, first, second)]
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key
    for key, value in states[1].items():
        assert torch.equal(states[2][key], value), key  # the adapters too: same seed, same numbers
    assert isinstance(first.stack.layers[0].mlp.up, LoRALinear)
    assert set(first.stack.layers[0].mlp.up.lora) == {"up"}


@pytest.mark.parametrize("raw, message", [
    ({"rank": 4, "targets": ["qq"]}, "lora.targets: 'qq' matches no module"),
    ({"rank": 0, "targets": ["q"]}, "lora.targets is set but lora.rank=0"),
    ({"targets": ["q"]}, "lora.targets is set but lora.rank=0"),
    ({"rank": -1}, "lora.rank: must be >= 0"),
    ({"rank": 4, "dropout": 1.0}, "lora.dropout"),
    ({"rank": 4, "targets": []}, "lora.targets: empty"),
])
def test_bad_lora_config_is_one_line(raw, message):
    with pytest.raises(ConfigError) as error:
        apply_lora(seeded(tiny(mlp="gelu")), LoraConfig.from_dict(raw, "lora"))
    assert message in str(error.value) and "\n" not in str(error.value)
