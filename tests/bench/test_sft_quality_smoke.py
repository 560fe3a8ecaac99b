"""The SFT bench: both sides train on exactly the same tokens and labels, and both learn."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("trl")
from bench import sft_quality as sq


@pytest.mark.slow
def test_smoke_both_sides_train_on_the_same_tokens_and_learn(tmp_path, capsys):
    out = tmp_path / "sq.json"
    assert sq.main(["--smoke", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    # TRL rendered and tokenized every training conversation into Tessera's tokens, labels on the same positions
    assert report["train_records"] == 108 and row["trl_same_tokens"] == report["train_records"], row
    # Measured here: held-out assistant loss 5.26 at the start, 5.02 (tessera) / 5.05 (TRL) after 12 steps
    for side in ("tessera", "trl"):
        assert math.isfinite(row[f"{side}_loss"]) and row[f"{side}_loss"] < report["start_loss"] - 0.1, row
    assert "| loss (nats) |" in capsys.readouterr().out


def test_assistant_nll_scores_only_the_assistant_tokens_cut_as_training_cuts_them(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 32, 12)
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1])
    labels = torch.from_numpy(np.where(mask[:10] > 0, ids[:10], -100))[None]  # seq_len 9: 10 tokens kept
    with torch.no_grad():
        expected = float(model(input_ids=torch.from_numpy(ids[:10])[None], labels=labels).loss)
    assert sq.assistant_nll(tmp_path, [(ids, mask)], seq_len=9) == pytest.approx(expected, rel=1e-5)


def test_trl_rows_are_the_conversation_split_before_its_last_assistant_turn():
    (row,) = sq.trl_rows([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}])
    assert row["completion"] == [{"role": "assistant", "content": "5"}]
    assert row["prompt"][-1]["role"] == "user" and "Add 2 and 3." in row["prompt"][-1]["content"]
