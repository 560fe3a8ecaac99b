"""`python -m launch.demo --recipe encoder|seq2seq --quick`: every stage runs, `tessera eval` scores the
fine-tuned model on held-out data and the summary reports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_recipe(name: str, out) -> str:
    result = subprocess.run([sys.executable, "-m", "launch.demo", "--recipe", name, "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in range(1, 7):
        assert f"=== {stage}/6" in result.stdout
    assert "=== done" in result.stdout
    return result.stdout


@pytest.mark.slow
def test_encoder_recipe_pretrains_fine_tunes_and_reports_accuracy(tmp_path):
    stdout = run_recipe("encoder", tmp_path)
    mlm = json.loads((tmp_path / "eval-mlm.json").read_text())
    cls = json.loads((tmp_path / "eval-classify.json").read_text())
    assert (mlm["kind"], mlm["objective"]) == ("text", "mlm") and mlm["tokens"] > 0
    assert (cls["kind"], cls["objective"]) == ("classification", "classify") and 0 <= cls["accuracy"] <= 1
    assert f"{cls['accuracy']:.4f} on {cls['samples']} messages" in stdout
    rows = [json.loads(line) for line in (tmp_path / "classify" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in row for row in rows)
    assert (tmp_path / "classify" / "checkpoints" / "latest").is_file()


@pytest.mark.slow
def test_seq2seq_recipe_pretrains_fine_tunes_and_reports_exact_match(tmp_path):
    stdout = run_recipe("seq2seq", tmp_path)
    scan = json.loads((tmp_path / "eval-scan.json").read_text())
    assert (scan["kind"], scan["objective"]) == ("seq2seq", "seq2seq") and 0 <= scan["exact_match"] <= 1
    assert f"{scan['exact_match']:.4f} on {scan['samples']} commands" in stdout
    span = [json.loads(line) for line in (tmp_path / "span" / "metrics.jsonl").read_text().splitlines()]
    assert span and span[-1]["step"] == 4
