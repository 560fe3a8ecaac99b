import pytest

from common.config import load_config
from common.errors import ConfigError, UserError
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


@pytest.mark.parametrize(("objective", "fix"), [
    ("online", "set align.loss to grpo or rloo or online_dpo"),
    ("kto", "set align.loss to kto"),
    ("ppo", "set align.loss to ppo"),
])
def test_an_objective_that_align_loss_chooses_must_agree_with_it_at_load(objective, fix):
    with pytest.raises(ConfigError, match=rf"^train\.objective={objective} disagrees with align\.loss=dpo, which "
                                          rf"trains preference: {fix} and leave train\.objective unset$"):
        load_config(RunConfig, None, [f"train.objective={objective}"])
    with pytest.raises(ConfigError, match=r"train\.objective=preference disagrees with align\.loss=grpo"):
        load_config(RunConfig, None, ["train.objective=preference", "align.loss=grpo", "align.reward=exact_match"])
    load_config(RunConfig, None, ["train.objective=online", "align.loss=rloo", "align.reward=exact_match"])


# (the command, its overrides, the refusal): each names the field and the fix in one line
TASK_REFUSALS = [
    ("pretrain", ["train.objective=sft"],
     r"train.objective=sft is trained by tessera sft, not tessera pretrain \(whose objectives are clm, mlm, span\); "
     "run tessera sft or change train.objective$"),
    ("sft", ["train.objective=mlm"], "train.objective=mlm is trained by tessera pretrain, not tessera sft "
                                     r"\(whose objectives are sft, classify, seq2seq\)"),
    ("pretrain", ["train.objective=preference"], "train.objective=preference is trained by tessera align, not "
                                                 "tessera pretrain"),
    ("sft", ["train.objective=reward"], "train.objective=reward is trained by tessera align, not tessera sft"),
    ("align", ["train.objective=classify"], "train.objective=classify is trained by tessera sft, not tessera align "
                                            r"\(whose objectives are preference, reward, online, kto, ppo\)"),
    ("align", ["train.strategy=ddp", "parallel.pp=2", "train.global_batch_size=16"],
     r"parallel.pp=2 trains train.objective=clm or sft, not preference \(the objective of align.loss=dpo\); "
     "set parallel.pp=1 to train it"),
    ("align", ["train.strategy=ddp", "parallel.pp=2", "train.global_batch_size=16", "align.loss=simpo"],
     r"parallel.pp=2 trains .* not preference \(the objective of align.loss=simpo\)"),
    ("align", ["train.strategy=ddp", "parallel.pp=2", "train.global_batch_size=16", "align.loss=kto"],
     r"parallel.pp=2 trains .* not kto \(the objective of align.loss=kto"),
    ("align", ["train.strategy=ddp", "parallel.pp=2", "train.global_batch_size=16", "align.loss=grpo",
               "align.reward=exact_match"],
     r"parallel.pp=2 trains .* not online \(the objective of align.loss=grpo\)"),
    ("align", ["train.strategy=ddp", "parallel.cp=2", "align.reference=precomputed"],
     r"parallel.cp=2 trains .* not preference \(the objective of align.loss=dpo\); set parallel.cp=1"),
]


@pytest.mark.parametrize(("task", "overrides", "message"), TASK_REFUSALS, ids=[" ".join(c[1]) for c in TASK_REFUSALS])
def test_what_the_command_cannot_train_is_refused_before_anything_is_built(task, overrides, message, tmp_path):
    """The config loads (these need the command to judge); the run refuses it before its rendezvous, its
    lock, the shards (none exist here) or the model: one line, in well under a second, nothing written."""
    import time

    from trainer.run import run

    where = [f"data.train={tmp_path / 'no-shards'}", f"log.dir={tmp_path / 'run'}"]
    cfg = load_config(RunConfig, None, [*overrides, *where])
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"^{message}") as info:
        run(cfg, task)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("task", "overrides"), [
    ("pretrain", []), ("pretrain", ["model.preset=tiny-bert"]), ("pretrain", ["train.objective=span"]),
    ("sft", []), ("sft", ["train.objective=seq2seq"]),
    ("sft", ["train.strategy=ddp", "parallel.pp=2", "train.global_batch_size=16"]),
    ("align", []), ("align", ["train.objective=reward"]), ("align", ["align.loss=kto", "train.objective=kto"]),
    ("pretrain", ["train.strategy=ddp", "parallel.cp=2"]),
])
def test_what_the_command_trains_passes_its_check(task, overrides):
    load_config(RunConfig, None, overrides).check_task(task)


def test_an_unknown_task_is_one_line():
    with pytest.raises(UserError, match=r"^unknown task 'finetune'; choose from pretrain, sft, align$"):
        load_config(RunConfig, None, []).check_task("finetune")
