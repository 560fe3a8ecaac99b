"""Model-test set-up."""

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet_flex_on_cpu():
    """FlexAttention warns that it runs uncompiled on CPU; that is the point of these tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield
