"""One table makes an objective: each row of ROWS is a train.objective choice whose build lives in
trainer/objectives/<name>.py and reads a batch shape the loader knows."""

import importlib

import pytest

from common.config import load_config
from common.errors import ConfigError
from data.loader import DATA_OBJECTIVES
from trainer.config import RunConfig
from trainer.objectives import OBJECTIVES, ROWS, ObjectiveName


def test_the_enum_and_the_lookup_are_made_from_the_rows():
    assert [str(name) for name in ObjectiveName] == list(ROWS)
    assert list(OBJECTIVES) == list(ObjectiveName)
    assert all(OBJECTIVES[ObjectiveName(name)] is spec for name, spec in ROWS.items())
    assert load_config(RunConfig, None, ["train.objective=kto", "align.loss=kto"]).train.objective is ObjectiveName.kto
    with pytest.raises(ConfigError, match="'ppo2' is not one of clm, mlm"):
        load_config(RunConfig, None, ["train.objective=ppo2"])


@pytest.mark.parametrize("name", list(ROWS))
def test_each_row_has_its_module_with_a_build(name):
    module = importlib.import_module(f"trainer.objectives.{name}")
    assert callable(module.build)


def test_each_samples_batch_shape_names_its_collator():
    for name, spec in DATA_OBJECTIVES.items():
        assert (spec.collate is not None) == (spec.unit == "samples"), name
