"""`tessera eval --tasks FILE.jsonl`: multiple-choice accuracy by log-likelihood. The right choice is
the model's own greedy continuation of the context and the others are random tokens, so acc must be
1.0 (and 0.0 with every label moved one choice on); acc_norm equals the per-character argmax
computed here by plain forward passes, one choice at a time."""

from __future__ import annotations

import json

import pytest
import torch
from recipe_data import SMS

from launch.cli import main
from model import build_model
from model.config import ModelConfig
from model.io import copy_tokenizer_files, save_pretrained

CHOICES = 4


def saved_decoder(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "tiny-llama", "vocab_size": tokenizer.vocab_size, "d_model": 32,
                                 "n_heads": 2, "d_ff": 64}, "model")
    model = build_model(cfg).eval()
    directory = save_pretrained(model, tmp_path / "decoder")
    copy_tokenizer_files(tokenizer.path, directory)
    return model, directory


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    for _ in range(steps):
        out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


@torch.no_grad()
def logprob(model, tok, context: str, choice: str) -> float:
    head, whole = tok.encode(context), tok.encode(context + " " + choice)
    logits = model(torch.tensor([whole[:-1]]))[0].log_softmax(-1)
    return sum(float(logits[t - 1, whole[t]]) for t in range(len(head), len(whole)))


def multiple_choice_items(model, tok, count: int = 12) -> list[dict]:
    """Contexts from SMS messages; the right choice is 4 greedy tokens whose text re-encodes to them."""
    rng = torch.Generator().manual_seed(0)
    items = []
    for line in SMS.read_text().splitlines():
        context = " ".join(line.split("\t", 1)[1].split()[:8])
        head = tok.encode(context)
        right = greedy(model, head, 4)
        text = tok.decode(right)
        if not text.startswith(" ") or not text[1:].strip() or tok.encode(context + text) != head + right:
            continue  # the choice must be scored as exactly the tokens the model chose
        wrong = [tok.decode(torch.randint(50, tok.vocab_size, (4,), generator=rng).tolist()).strip()
                 for _ in range(CHOICES - 1)]
        if not all(wrong):
            continue
        label = len(items) % CHOICES
        items.append({"context": context, "choices": [*wrong[:label], text[1:], *wrong[label:]], "label": label})
        if len(items) == count:
            return items
    raise AssertionError(f"only {len(items)} usable contexts")


def write_tasks(path, items: list[dict], shift: int = 0):
    """Half the records in HellaSwag's raw names (ctx, endings, label as a string), half in ours."""
    with path.open("w") as f:
        for i, item in enumerate(items):
            label = (item["label"] + shift) % CHOICES
            record = ({"ctx": item["context"], "endings": item["choices"], "label": str(label)} if i % 2 else
                      {"context": item["context"], "choices": item["choices"], "label": label})
            f.write(json.dumps(record) + "\n")
    return path


def run_tasks(tmp_path, checkpoint, tasks) -> dict:
    out = tmp_path / "tasks.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", str(tasks), "--batch-size", "5",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_greedy_continuations_score_acc_one_and_acc_norm_equals_per_choice_scores(tmp_path, task_tokenizer):
    model, ckpt = saved_decoder(tmp_path, task_tokenizer)
    items = multiple_choice_items(model, task_tokenizer)
    result = run_tasks(tmp_path, ckpt, write_tasks(tmp_path / "mc.jsonl", items))
    shifted = run_tasks(tmp_path, ckpt, write_tasks(tmp_path / "shifted.jsonl", items, shift=1))
    norm_right = 0
    for item in items:
        scores = [logprob(model, task_tokenizer, item["context"], c) / len(c) for c in item["choices"]]
        norm_right += scores.index(max(scores)) == item["label"]
    assert (result["samples"], result["chance"]) == (12, 0.25)
    assert result["acc"] == 1.0 and shifted["acc"] == 0.0
    assert result["acc_norm"] == norm_right / 12


def test_bad_task_records_non_decoders_and_bad_lm_eval_paths_are_one_line_errors(tmp_path, task_tokenizer, capsys):
    _, decoder = saved_decoder(tmp_path, task_tokenizer)
    cfg = ModelConfig.from_dict({"preset": "tiny-bert", "vocab_size": task_tokenizer.vocab_size}, "model")
    encoder = save_pretrained(build_model(cfg), tmp_path / "encoder")
    copy_tokenizer_files(task_tokenizer.path, encoder)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"query": "a b", "choices": ["c", "d"], "gold": 1}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "a b", "choices": ["c", "d"], "gold": 1}) + "\n"
                   + json.dumps({"query": "a b", "choices": ["c", "d"], "label": 2}) + "\n")
    cases = [
        (decoder, bad, f"{bad}:2: the label must be the index of the right choice (0 to 1), got 2"),
        (decoder, tmp_path / "none.jsonl", f"no such file: {tmp_path / 'none.jsonl'}"),
        (encoder, good, f"multiple-choice tasks need a decoder LM; {encoder} holds an LM of arch encoder"),
    ]
    for checkpoint, tasks, message in cases:
        assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", str(tasks)]) == 2
        assert capsys.readouterr().err == f"tessera eval: error: {message}\n"
    missing = tmp_path / "no-tasks"
    assert main(["eval", "--checkpoint", str(decoder), "--lm-eval", "mc", "--include-path", str(missing)]) == 2
    assert capsys.readouterr().err == f"tessera eval: error: --include-path {missing} is not a directory\n"
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(decoder), "--tasks", str(good), "--data", str(tmp_path)])
