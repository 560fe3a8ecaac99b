"""`tessera config show|schema`: what a run reads, and a schema that agrees with the loader."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from common.config import read_yaml
from common.errors import ConfigError
from launch import cli, config_reference
from launch.entry import load
from trainer.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p for folder in ("pretrain", "sft", "align", "recipes") for p in (CONFIGS / folder).glob("*.yaml"))


def test_show_prints_the_resolved_config_a_run_reads(capsys):
    recipe = CONFIGS / "pretrain" / "tiny-cpu.yaml"
    assert cli.main(["config", "show", "--config", str(recipe), "train.lr=1e-3", "train.min_lr=1e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load(recipe, ["train.lr=1e-3", "train.min_lr=1e-4"]).to_dict()
    assert shown["train"]["lr"] == 1e-3 and shown["checkpoint"]["keep_last"] == 2  # override, recipe
    assert shown["train"]["eps"] == 1e-8 and shown["model"]["n_layers"] == 2  # defaults, the preset's size
    assert RunConfig.from_dict(shown).to_dict() == shown  # what it prints runs as a recipe, unchanged


def test_show_refuses_a_bad_override_in_one_line(capsys):
    assert cli.main(["config", "show", "train.strategy=tp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.strategy: 'tp' is not one of single, ddp, fsdp" in err


@pytest.fixture(scope="module")
def schema():
    return config_reference.json_schema(RunConfig)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_validates_against_the_schema(schema, recipe):
    jsonschema.validate(read_yaml(recipe), schema)
    load(recipe, [])


@pytest.mark.parametrize("bad", [
    {"train": {"lr_rate": 1e-3}},  # unknown key
    {"train": {"strategy": "tp"}},  # a choice outside the enum
    {"train": {"max_steps": "many"}},  # a wrong type
    {"optimizer": {}},  # an unknown section
])
def test_schema_and_loader_refuse_the_same_mistakes(schema, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(ConfigError):
        RunConfig.from_dict(bad)


def test_schema_carries_defaults_notes_and_choices(schema, capsys):
    train = schema["properties"]["train"]["properties"]
    assert train["micro_batch_size"] == {"type": "integer", "default": 8}
    assert train["strategy"]["enum"] == ["single", "ddp", "fsdp", "zero1", "zero2", "zero3"]
    assert "0 disables clipping" in train["grad_clip"]["description"]
    jsonschema.validate({"train": {"lr": "3e-4"}}, schema)  # YAML 1.1 reads 3e-4 as a string; so does the loader
    assert cli.main(["config", "schema"]) == 0
    assert capsys.readouterr().out == config_reference.reference(RunConfig)
