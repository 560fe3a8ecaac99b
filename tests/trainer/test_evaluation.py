"""trainer.evaluation: one loop sums every unit and divides once (batch split does not weigh in), the
objective comes from the objective tables, and a shard kind nothing scores is a one-line error."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from model import build_model
from model.config import ModelConfig
from trainer.evaluation import eval_objective, evaluate, shard_objective
from trainer.objectives import ObjectiveName


def tiny_decoder() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "tiny-llama", "vocab_size": 40, "d_model": 16, "n_heads": 2,
                                 "d_ff": 32, "n_layers": 1}, "model")
    return build_model(cfg).eval()


def batch(rows: torch.Tensor, labelled: int) -> dict[str, torch.Tensor]:
    labels = rows[:, 1:].clone()
    labels[:, : labels.shape[1] - labelled] = -100
    return {"input_ids": rows[:, :-1], "labels": labels}


@torch.no_grad()
def test_loss_is_the_mean_over_every_token_not_over_batches():
    model = tiny_decoder()
    objective = eval_objective(ObjectiveName.clm, model, None)
    rows = torch.randint(0, 40, (5, 9), generator=torch.Generator().manual_seed(1))
    batches = [batch(rows[:1], 8), batch(rows[1:], 1)]  # 8 tokens, then 4 rows x 1 token
    scores = evaluate(model, objective, batches)
    losses = [F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten(), reduction="sum")
              for b in batches]
    assert scores.units == 12
    assert scores.means["loss"] == pytest.approx(float(sum(losses)) / 12, rel=1e-6)
    per_batch_mean = (float(losses[0]) / 8 + float(losses[1]) / 4) / 2
    assert abs(scores.means["loss"] - per_batch_mean) > 1e-3  # the two differ on this data
    assert evaluate(model, objective, batches, max_batches=1).units == 8


def test_objective_for_shards_comes_from_the_tables_and_unknown_kinds_are_one_line():
    model = tiny_decoder()
    assert shard_objective("text", model, None, "m") is ObjectiveName.clm
    assert shard_objective("sft", model, None, "m") is ObjectiveName.sft
    assert shard_objective("preference", model, None, "m") is ObjectiveName.preference
    with pytest.raises(UserError, match=r"^tessera eval does not score prompt shards; it scores text, "):
        shard_objective("prompt", model, None, "m")


def test_eval_tasks_that_are_missing_or_share_a_name_fail_at_config_load(tmp_path):
    from common.errors import ConfigError
    from trainer.config import RunConfig

    missing = tmp_path / "none.jsonl"
    with pytest.raises(ConfigError, match=f"^train\\.eval_tasks: no such file: {re.escape(str(missing))} "):
        RunConfig.from_dict({"train": {"eval_tasks": [str(missing)]}})
    (tmp_path / "a").mkdir()
    twins = [tmp_path / "mc.jsonl", tmp_path / "a" / "mc.jsonl"]
    for path in twins:
        path.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"^train\.eval_tasks: two files share a name"):
        RunConfig.from_dict({"train": {"eval_tasks": [str(p) for p in twins]}})
