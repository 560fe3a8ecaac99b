"""Fixtures for the task recipes' tests: the shipped SMS and SCAN files and a tokenizer trained on both."""

from __future__ import annotations

import pytest
from recipe_data import SCAN_TEST, SCAN_TRAIN, SMS


@pytest.fixture(scope="session")
def task_tokenizer(tmp_path_factory):
    """A small byte-level BPE trained on SMS messages and SCAN lines."""
    from data.tokenizer import train_tokenizer

    texts = [line.split("\t", 1)[1] for line in SMS.read_text().splitlines()[:800]]
    texts += SCAN_TRAIN.read_text().splitlines()[:400]
    return train_tokenizer(texts, tmp_path_factory.mktemp("task_tokenizer"), vocab_size=700)


@pytest.fixture()
def small_files(tmp_path):
    """The first 40 SMS lines and the first 12 SCAN test lines as their own files."""
    sms = tmp_path / "sms.tsv"
    sms.write_text("\n".join(SMS.read_text().splitlines()[:40]) + "\n")
    scan = tmp_path / "scan.txt"
    scan.write_text("\n".join(SCAN_TEST.read_text().splitlines()[:12]) + "\n")
    return sms, scan
