"""Tiny model configs shared by the model tests."""

import warnings

import pytest

from model import ModelConfig

TINY = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 32}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**TINY, **overrides})


@pytest.fixture(autouse=True)
def _quiet_flex_on_cpu():
    """FlexAttention warns that it runs uncompiled on CPU; that is the point of these tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield
