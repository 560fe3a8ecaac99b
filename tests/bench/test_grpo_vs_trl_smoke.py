"""The GRPO bench: both sides run on the same prompts' tokens, with the same reward code."""

import json

import pytest

pytest.importorskip("trl")
from bench import grpo_vs_trl as gv


@pytest.mark.slow
def test_smoke_both_sides_run_on_the_same_prompt_tokens(tmp_path, capsys):
    out = tmp_path / "gv.json"
    assert gv.main(["--smoke", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    # TRL's chat-template tokenization of every prompt equals Tessera's prompt shards
    assert row["trl_same_prompt_tokens"] == report["prompt_records"] > 0, row
    for side in ("tessera", "trl"):  # a 60-step SFT answers nothing right yet: learning is the full run's job
        assert 0 <= row[f"{side}_exact_match"] <= 1 and 0 <= row[f"{side}_reward_mean"] <= 1, row
        assert row[f"{side}_s_per_step"] > 0
    assert "| held-out exact match" in capsys.readouterr().out


def test_the_trl_reward_is_tessera_exact_match_on_the_completion_text():
    completions = [[{"role": "assistant", "content": " 46 "}], [{"role": "assistant", "content": "36"}]]
    assert gv.exact_match_reward(["12+34"] * 2, completions, answer=["46", "46"]) == [1.0, 0.0]


def test_reward_ends_average_the_first_and_last_ten_steps():
    assert gv.reward_ends([0.0] * 10 + [0.5] * 40 + [1.0] * 10) == (0.0, 1.0)
    assert gv.reward_ends([0.2, 0.4, 0.6]) == (0.2, 0.6)  # fewer than ten steps: one at each end
