"""`make demo` end to end (its --quick variant): every stage runs and leaves what it promises."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "launch.demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in range(1, 10):
        assert f"=== {stage}/9" in result.stdout
    assert "=== done" in result.stdout and "transformers: What is the capital of France? →" in result.stdout
    for run in ("pretrain", "sft", "dpo"):
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert rows and all({"step", "loss", "lr", "tokens_per_s"} <= row.keys() for row in rows)
        assert (out / run / "plots" / "loss.png").is_file()
        assert list((out / run / "wandb").glob("offline-run-*"))
    dpo = (out / "dpo" / "metrics.jsonl").read_text()
    assert "rewards/margins" in dpo and "eval/rewards/accuracies" in dpo and "eval/ppl" not in dpo
    assert json.loads((out / "export" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
