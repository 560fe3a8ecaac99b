"""The checkpoints/ layout and the one walk from a user's path to the step it means."""

import pytest

from common.checkpoint_layout import is_step, named_by_latest, rank_file, resolve_step, step_dirs, step_name
from common.errors import UserError
from common.manifest import write_manifest


def test_steps_sort_by_number_not_by_name(tmp_path):
    for step in (999_999, 1_000_000, 5):
        (tmp_path / step_name(step)).mkdir()
    (tmp_path / "step_12").mkdir()  # not a step's name (fewer than six digits)
    (tmp_path / "step_000007").write_text("a file, not a step")
    assert [p.name for p in step_dirs(tmp_path)] == ["step_1000000", "step_999999", "step_000005"]
    assert step_dirs(tmp_path / "nowhere") == []


def test_latest_names_the_step_a_checkpoints_directory_means(tmp_path):
    (tmp_path / "step_000002").mkdir()
    assert named_by_latest(tmp_path) is None and resolve_step(tmp_path) == tmp_path
    (tmp_path / "latest").write_text("step_000002\n")
    assert resolve_step(tmp_path) == tmp_path / "step_000002"
    (tmp_path / "latest").write_text("  \n")
    with pytest.raises(UserError, match="latest: empty; it should hold the name of a checkpoint sub-directory"):
        resolve_step(tmp_path)
    with pytest.raises(UserError, match="checkpoint not found"):
        resolve_step(tmp_path / "nope")


def test_a_step_is_known_by_its_manifest_or_its_state_files(tmp_path):
    step = tmp_path / "step_000001"
    (step / "model").mkdir(parents=True)
    assert not is_step(step)
    (step / rank_file(0)).write_bytes(b"x")
    assert is_step(step)
    (step / rank_file(0)).unlink()
    write_manifest(step)
    assert is_step(step)
