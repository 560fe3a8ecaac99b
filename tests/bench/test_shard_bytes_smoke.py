"""The shards-on-disk bench on two corpora, this tree as its own base: packed text stays at most 2.5
bytes a token (issue 19's goal), and the two trees' batches are compared."""

import json

import pytest

from bench import shard_bytes


@pytest.mark.slow
def test_smoke_measures_bytes_per_token_and_compares_batches(tmp_path, capsys):
    out = tmp_path / "shard_bytes.json"
    assert shard_bytes.main(["--smoke", "--base", str(shard_bytes.ROOT), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    after, before = result["sizes"]["after"], result["sizes"]["before"]
    assert after == before and set(after) == {*shard_bytes.SMOKE_CORPORA, shard_bytes.SHORT_DOCS}
    assert after["tinystories_valid_head"]["bytes_per_token"] <= 2.5
    assert after[shard_bytes.SHORT_DOCS]["bytes_per_token"] <= 2.5  # 40-token documents
    assert after["sft_rasbt"]["version"] == 3 and after["sft_rasbt"]["samples"] == 1100
    assert list(result["same_batches"].values()) == [True, True]
    assert "B/token" in capsys.readouterr().out
