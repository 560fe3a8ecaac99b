import os
import random

import numpy as np
import pytest
import torch

from common.errors import UserError
from trainer import checkpoint
from trainer.checkpoint import rng_state, set_rng_state


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_in_a_rank_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / checkpoint.rank_file(0)
    torch.save({"loader": {}, "rng": Payload(marker)}, path)
    with pytest.raises(UserError) as info:
        checkpoint.load_rank_state(path)
    assert not marker.exists()
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_rng_state_round_trips_without_pickle(tmp_path):
    path = tmp_path / checkpoint.rank_file(0)
    torch.save({"loader": {"epoch": 1, "data": "abc"}, "rng": rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(checkpoint.load_rank_state(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
