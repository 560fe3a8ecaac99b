import math

import pytest

from trainer.guard import LossGuard, TrainingDiverged


def test_non_finite_and_empty_steps_are_skipped():
    guard = LossGuard(max_bad_steps=5, spike_factor=0)
    assert guard.check(math.nan, 10) == "loss is nan"
    assert guard.check(math.inf, 10) == "loss is inf"
    assert "no target tokens" in guard.check(1.0, 0)
    assert guard.check(2.0, 10) is None


def test_spike_needs_history_then_triggers():
    guard = LossGuard(max_bad_steps=5, spike_factor=3.0)
    assert guard.check(100.0, 1) is None  # no history yet
    for step in range(10):
        guard.record(step, 2.0, None)
    assert guard.check(5.9, 1) is None
    assert guard.check(6.1, 1).startswith("loss spike")


def test_too_many_bad_steps_stop_with_one_line():
    guard = LossGuard(max_bad_steps=2, spike_factor=0)
    guard.record(1, math.nan, "loss is nan")
    guard.record(2, math.nan, "loss is nan")
    with pytest.raises(TrainingDiverged) as info:
        guard.record(3, math.nan, "loss is nan")
    assert "\n" not in str(info.value) and "stopped at step 3" in str(info.value)


def test_state_round_trip():
    guard = LossGuard(max_bad_steps=5, spike_factor=2.0)
    guard.record(1, 1.5, None)
    guard.record(2, math.nan, "loss is nan")
    other = LossGuard(max_bad_steps=5, spike_factor=2.0)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()
