import pytest

from launch.cli import main, parse


def test_overrides_may_follow_options():
    args = parse(["pretrain", "a.b=1", "--nproc", "2", "c.d=2"], "pretrain")
    assert args.nproc == 2 and args.overrides == ["a.b=1", "c.d=2"]


def test_stray_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse(["pretrain", "a.b=1", "--nproc", "2", "--bogus"], "pretrain")
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_unknown_command_is_one_line(capsys):
    assert main(["pretrian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tessera: error: unknown command 'pretrian'; choose from prep, tokenizer, shard, pretrain, sft, align, "
        "generate, export, import, eval, slurm, plot, config"
    )
