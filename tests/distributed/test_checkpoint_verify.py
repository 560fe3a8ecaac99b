"""Two ranks share out the hashing of a checkpoint; a bad file found by either stops both with its name."""

from __future__ import annotations

import pytest
from spawn import RanksFailed, spawn

from common.manifest import damaged_error, write_manifest
from trainer import checkpoint
from trainer.distributed import init_distributed, teardown


def verify_on_each_rank(step_dir):
    env = init_distributed(need_group=True, timeout_s=60)
    try:
        checkpoint.verify(step_dir, env)
        return env.rank
    finally:
        teardown(barrier=False)


@pytest.mark.parametrize("damaged", [None, "b.bin", "c.bin"])  # names[0::2] → rank 0, names[1::2] → rank 1
def test_ranks_share_the_hashing_and_agree_on_a_bad_file(tmp_path, damaged):
    for name in ("a.bin", "b.bin", "c.bin", "d.bin"):
        (tmp_path / name).write_bytes(name.encode() * 1000)
    write_manifest(tmp_path)
    if damaged is None:
        assert spawn(verify_on_each_rank, 2, tmp_path, timeout=120) == [0, 1]
        return
    (tmp_path / damaged).write_bytes(b"X" * (tmp_path / damaged).stat().st_size)
    with pytest.raises(RanksFailed) as info:
        spawn(verify_on_each_rank, 2, tmp_path, timeout=120)
    assert info.value.error == ("UserError", damaged_error(tmp_path, damaged).args[0])
