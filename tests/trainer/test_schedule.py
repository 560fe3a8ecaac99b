import itertools
import math

import pytest

from trainer.config import TrainConfig
from trainer.schedule import lr_at


def cfg(**kw) -> TrainConfig:
    base = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "max_steps": 110}
    return TrainConfig.from_dict({**base, **kw}, "train")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_and_reaches_peak(schedule):
    c = cfg(schedule=schedule)
    assert [lr_at(s, c) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_midpoint_and_end():
    c = cfg(schedule="cosine")
    assert lr_at(59, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(109, c) == pytest.approx(0.1)


def test_linear_decays_to_min():
    c = cfg(schedule="linear")
    lrs = [lr_at(s, c) for s in range(10, 110)]
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    c = cfg(schedule="wsd", decay_fraction=0.2)  # decay over steps 88..109
    assert {lr_at(s, c) for s in range(10, 88)} == {1.0}
    assert lr_at(88, c) < 1.0
    assert lr_at(109, c) == pytest.approx(0.1)


def test_constant_stays():
    c = cfg(schedule="constant")
    assert lr_at(100, c) == 1.0
