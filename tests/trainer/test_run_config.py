import pytest

from common.config import load_config
from common.errors import ConfigError
from trainer.config import RunConfig


def test_defaults_and_contract_names():
    cfg = load_config(RunConfig, None, [
        "train.strategy=fsdp", "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=5",
        "train.lr=1e-3", "train.seed=3", "checkpoint.dir=/tmp/ck", "checkpoint.every=2", "log.dir=/tmp/run",
        "log.wandb=true", "data.train=/tmp/shards", "data.valid=/tmp/valid", "data.seq_len=64",
        "model.preset=tiny-llama", "model.init=/tmp/init", "align.loss=ipo", "align.beta=0.2",
        "align.reference=precomputed",
    ])
    assert cfg.train.strategy == "fsdp" and cfg.train.global_batch_size == 8
    assert str(cfg.checkpoint_dir) == "/tmp/ck" and cfg.model.d_model == 64
    assert cfg.model.vocab_from_tokenizer  # the preset's vocab_size is replaced by the tokenizer's
    assert cfg.model.model_config().to_dict()["d_model"] == 64


def test_explicit_vocab_size_is_kept():
    assert not load_config(RunConfig, None, ["model.vocab_size=1000"]).model.vocab_from_tokenizer


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.strategy=zero4", "train.strategy: 'zero4' is not one of single, ddp, fsdp, zero1, zero2, zero3"),
        ("train.global_batch_size=10", "not a multiple of micro_batch_size 8"),
        ("train.offload=optimizer", "offload: needs strategy fsdp or zero1/2/3"),
        ("train.warmup_steps=-1", "warmup_steps"),
        ("align.loss=ppo", "align.loss"),
        ("train.deepspeed_config=/any/ds_config.json", "deepspeed_config: only used by zero1/zero2/zero3"),
        ("train.objective=dpo", "train.objective: 'dpo' is not one of clm, mlm, span, sft, preference, reward"),
    ],
)
def test_bad_values_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(RunConfig, None, [override])
    assert "\n" not in str(info.value)


def test_defaults_are_consistent_and_seq_len_is_checked():
    cfg = load_config(RunConfig, None, [])
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    with pytest.raises(ConfigError, match=r"data\.seq_len=256 exceeds model\.max_seq_len=128") as info:
        load_config(RunConfig, None, ["model.max_seq_len=128", "data.seq_len=256"])
    assert "\n" not in str(info.value)
    load_config(RunConfig, None, ["model.max_seq_len=128", "data.seq_len=256", "model.pos=alibi"])  # no table


def test_a_resolved_config_of_an_earlier_version_with_an_empty_sft_section_still_loads(tmp_path):
    import yaml

    from common.config import dump_yaml

    path = tmp_path / "config.yaml"
    dump_yaml(load_config(RunConfig, None, ["train.lr=0.002"]), path)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "sft": {}}))
    assert load_config(RunConfig, path, []).train.lr == 0.002
    with pytest.raises(ConfigError, match="unknown config key 'sft'"):
        load_config(RunConfig, path, ["sft.epochs=2"])
