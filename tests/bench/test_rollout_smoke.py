"""The rollout bench runs on CPU and reports its split."""

import json

from bench import rollout


def test_smoke_reports_the_rollout_training_split(tmp_path):
    out = tmp_path / "rollout.json"
    row = rollout.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == row
    assert row["sequences"] == 4 and row["rollout_tokens_per_s"] > 0 and 0 < row["rollout_share"] < 1
