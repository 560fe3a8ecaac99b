"""`tessera eval` on each shard kind with tiny models: every number equals one computed here
independently (each sample alone, unpadded, by plain forward passes)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recipe_data import DATA, SCAN_TEST, SMS

from data.make_shards import make_shards
from data.shard_set import ShardSet, Source
from data.shards import ShardWriter
from launch.cli import main
from model import build_model
from model.config import ModelConfig
from model.io import copy_tokenizer_files, save_pretrained


def saved_model(tmp_path, tokenizer, preset: str, head: str = "lm", **extra):
    """A seeded tiny model over the tokenizer's vocabulary, saved with its tokenizer files."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": preset, "vocab_size": tokenizer.vocab_size, "d_model": 32, "n_heads": 2,
                                 "d_ff": 64, **extra}, "model")
    model = build_model(cfg, head=head).eval()
    directory = save_pretrained(model, tmp_path / f"{preset}-{head}")
    copy_tokenizer_files(tokenizer.path, directory)
    return model, directory


def run_eval(tmp_path, checkpoint, data, *extra: str) -> dict:
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@torch.no_grad()
def test_text_perplexity_of_a_decoder_equals_next_token_ce_over_rows(tmp_path, task_tokenizer):
    text = tmp_path / "one.txt"
    text.write_text(" ".join(SMS.read_text().splitlines()[:30]))
    make_shards([str(text)], task_tokenizer.path, tmp_path / "text", txt_mode="file")
    model, ckpt = saved_model(tmp_path, task_tokenizer, "tiny-llama")
    result = run_eval(tmp_path, ckpt, tmp_path / "text", "--seq-len", "16", "--batch-size", "3", "--max-batches", "2")
    tokens = torch.from_numpy(ShardSet([Source(str(tmp_path / "text"))]).read(0).astype(np.int64))
    rows = [tokens[g * 16 : g * 16 + 17] for g in range(6)]  # one document: rows overlap by one token
    loss = sum(F.cross_entropy(model(r[None, :-1])[0], r[1:], reduction="sum") for r in rows) / 96
    assert (result["kind"], result["objective"], result["tokens"]) == ("text", "clm", 96)
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_text_eval_of_an_encoder_is_seeded_masked_lm(tmp_path, task_tokenizer, small_files):
    sms, _ = small_files
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(line.split("\t", 1)[1] + "\n" for line in sms.read_text().splitlines()))
    make_shards([str(texts)], task_tokenizer.path, tmp_path / "text", txt_mode="line")
    _, ckpt = saved_model(tmp_path, task_tokenizer, "tiny-bert")
    first, again = run_eval(tmp_path, ckpt, tmp_path / "text"), run_eval(tmp_path, ckpt, tmp_path / "text")
    other = run_eval(tmp_path, ckpt, tmp_path / "text", "--seed", "1")
    assert first["objective"] == "mlm" and first == again
    assert 0 < first["tokens"] < ShardSet([Source(str(tmp_path / "text"))]).counts.sum() * 0.3
    assert (other["loss"], other["tokens"]) != (first["loss"], first["tokens"])
    assert first["ppl"] == pytest.approx(math.exp(first["loss"]))


@torch.no_grad()
def test_classification_accuracy_and_loss_equal_per_message_scores(tmp_path, task_tokenizer, small_files):
    sms, _ = small_files
    make_shards([str(sms)], task_tokenizer.path, tmp_path / "cls", kind="classification", max_len=48)
    model, ckpt = saved_model(tmp_path, task_tokenizer, "tiny-bert", head="classifier", n_labels=2)
    result = run_eval(tmp_path, ckpt, tmp_path, "--split", "cls", "--batch-size", "16", "--seq-len", "48")
    shards = ShardSet([Source(str(tmp_path / "cls"))])
    labels = torch.tensor([int(shards.read(i, 1)[0]) for i in range(40)])
    scores = torch.cat([model(torch.from_numpy(shards.read(i).astype(np.int64))[None]) for i in range(40)])
    assert (result["kind"], result["samples"]) == ("classification", 40)
    assert result["accuracy"] == (scores.argmax(-1) == labels).sum().item() / 40
    assert result["loss"] == pytest.approx(F.cross_entropy(scores, labels).item(), rel=1e-4)
    assert result["majority_accuracy"] == max(Counter(labels.tolist()).values()) / 40


@torch.no_grad()
def greedy(model, source: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache, no padding)."""
    decoded = [model.config.pad_token_id]
    for _ in range(steps):
        decoded.append(int(model(source[None], torch.tensor([decoded]))[0, -1].argmax()))
        if decoded[-1] == eos:
            break
    return decoded[1:]


@torch.no_grad()
def test_seq2seq_exact_match_and_token_loss_equal_greedy_decoding_done_here(tmp_path, task_tokenizer):
    """Targets are the model's own greedy outputs for even rows and a changed last token for odd rows,
    so exact match must be exactly one half (with padding, batching and the KV cache in play)."""
    model, ckpt = saved_model(tmp_path, task_tokenizer, "tiny-t5")
    tok = task_tokenizer
    commands = [line.split(" OUT: ")[0][4:] for line in SCAN_TEST.read_text().splitlines()[:10]]
    sources = [[*tok.encode(command), tok.eos_id] for command in commands]
    targets = []
    for i, source in enumerate(sources):
        target = greedy(model, torch.tensor(source), 3 + i % 5, tok.eos_id)
        if i % 2:
            target[-1] = (target[-1] + 1) % tok.vocab_size
        targets.append(target)
    writer = ShardWriter(tmp_path / "s2s", kind="seq2seq", vocab_size=tok.vocab_size, tokenizer_sha256=tok.sha256)
    for source, target in zip(sources, targets):
        writer.write({"source": source, "target": target})
    writer.close()
    result = run_eval(tmp_path, ckpt, tmp_path / "s2s", "--batch-size", "4", "--seq-len", "64")
    logits = [model(torch.tensor([s]), torch.tensor([[0, *t[:-1]]]))[0] for s, t in zip(sources, targets)]
    total = sum(F.cross_entropy(x, torch.tensor(t), reduction="sum") for x, t in zip(logits, targets))
    hits = sum(int((x.argmax(-1) == torch.tensor(t)).sum()) for x, t in zip(logits, targets))
    count = sum(map(len, targets))
    assert (result["kind"], result["samples"], result["tokens"]) == ("seq2seq", 10, count)
    assert result["exact_match"] == 0.5
    assert result["token_accuracy"] == hits / count == (count - 5) / count  # odd rows miss their last token
    assert result["loss"] == pytest.approx(total.item() / count, rel=1e-4)


@torch.no_grad()
def test_preference_logp_accuracy_and_margin_equal_summed_response_logprobs(tmp_path, task_tokenizer):
    pairs = json.loads((DATA / "pref_rasbt_instruction_data_with_preference.json").read_text())[:12]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    make_shards([str(tmp_path / "pairs.json")], task_tokenizer.path, tmp_path / "pairs", kind="preference")
    model, ckpt = saved_model(tmp_path, task_tokenizer, "tiny-llama")
    result = run_eval(tmp_path, ckpt, tmp_path / "pairs", "--batch-size", "5", "--seq-len", "500")
    shards = ShardSet([Source(str(tmp_path / "pairs"))])

    def logp(prompt: np.ndarray, response: np.ndarray) -> float:
        ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))
        logprobs = model(ids[None, :-1])[0].log_softmax(-1)
        return logprobs[len(prompt) - 1 :].gather(1, ids[len(prompt) :, None]).sum().item()

    diffs = [logp(shards.read(i, 0), shards.read(i, 1)) - logp(shards.read(i, 0), shards.read(i, 2)) for i in range(12)]
    assert max(len(shards.read(i, 0)) + len(shards.read(i, f)) for i in range(12) for f in (1, 2)) <= 501
    assert (result["kind"], result["pairs"]) == ("preference", 12)
    assert result["logp_accuracy"] == sum(d > 0 for d in diffs) / 12
    assert result["logp_margin"] == pytest.approx(sum(diffs) / 12, rel=1e-4, abs=1e-4)


def test_mismatches_and_missing_inputs_are_one_line_errors(tmp_path, task_tokenizer, small_files, capsys):
    sms, scan = small_files
    make_shards([str(sms)], task_tokenizer.path, tmp_path / "cls", kind="classification")
    make_shards([str(scan)], task_tokenizer.path, tmp_path / "s2s", kind="seq2seq")
    _, lm = saved_model(tmp_path, task_tokenizer, "tiny-bert")
    _, three = saved_model(tmp_path, task_tokenizer, "tiny-bert", head="classifier", n_labels=3)
    cases = [
        (lm, tmp_path / "cls", "classification shards need a classifier (train.objective=classify); "
                               f"{lm} holds an LM of arch encoder"),
        (three, tmp_path / "s2s", f"seq2seq shards need an encoder_decoder model; {three} holds a classifier"),
        (three, tmp_path / "cls", f"{three} scores 3 labels; the shards name 2: ['ham', 'spam']"),
        (tmp_path / "nowhere", tmp_path / "cls", f"checkpoint not found: {tmp_path / 'nowhere'} is not a directory"),
        (lm, tmp_path / "none", f"no shards at {tmp_path / 'none'}: no manifest.json there or in "
                                f"{tmp_path / 'none' / 'valid'} (make them with tessera shard)"),
    ]
    for checkpoint, data, message in cases:
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data)]) == 2
        assert capsys.readouterr().err == f"tessera eval: error: {message}\n"
