import pytest

from common.config import load_config
from common.errors import ConfigError
from model import Arch, ModelConfig, Pos
from model.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = ModelConfig.from_dict({"preset": name})
    assert cfg.preset == name
    assert cfg.d_model % cfg.n_heads == 0


def test_given_keys_override_the_preset():
    cfg = ModelConfig.from_dict({"preset": "llama-1b", "vocab_size": 2000, "attn": "eager"})
    shape = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff)
    assert shape == (2000, 2048, 16, 32, 8, 8192)
    assert cfg.attn == "eager"


def test_to_dict_round_trips():
    cfg = ModelConfig.from_dict({"preset": "tiny-t5", "dropout": 0.1})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("raw", "message"), [
    ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads: n_heads=4 is not divisible by n_kv_heads=3"),
    ({"d_model": 66, "n_heads": 4}, "model.n_heads: d_model=66 is not divisible by n_heads=4"),
    ({"arch": "encoder_decoder", "pos": "alibi"}, "model.pos: alibi is not defined for encoder_decoder"),
    ({"arch": "encoder", "pos": "none"}, "model.pos: pos=none leaves arch=encoder without any order"),
    ({"arch": "encoder", "sliding_window": 8}, "model.sliding_window: only arch=decoder"),
    ({"attn": "flex", "dropout": 0.1}, "model.attn: flex attention has no attention dropout"),
    ({"preset": "llama-7b"}, "model.preset: unknown preset 'llama-7b'; choose from"),
    ({"d_modle": 64}, "unknown config key 'model.d_modle'"),
    ({"pos": "rotary"}, "model.pos: 'rotary' is not one of learned, sinusoidal, rope, alibi, t5_bias, none"),
    ({"dropout": 1.5}, "model.dropout: must be in [0, 1)"),
    ({"n_decoder_layers": 2}, "model.n_decoder_layers: only arch=encoder_decoder"),
    ({"pos": "alibi", "rope_scaling_factor": 8.0}, "model.rope_scaling_factor: scales RoPE frequencies; pos is alibi"),
])
def test_bad_configs_fail_with_one_line(raw, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(raw, "model")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_yaml_overrides_reach_the_model_config(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("preset: tiny-gpt2\nn_layers: 3\n")
    cfg = load_config(ModelConfig, path, ["pos=alibi", "arch=encoder"])
    assert (cfg.n_layers, cfg.pos, cfg.arch) == (3, Pos.alibi, Arch.encoder)
