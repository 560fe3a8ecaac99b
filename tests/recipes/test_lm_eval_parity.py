"""lm-evaluation-harness as the peer: its Hugging Face model (``HFLM``) on ``tessera export``'s output,
offline, on a task YAML and jsonl made here, gives the same acc and acc_norm as ``tessera eval
--tasks`` on the same records, and the same log-likelihood for every choice; ``tessera eval --lm-eval``
(export to a temporary directory, then the harness) reports the harness's numbers. lm-eval's HFLM prepends
the tokenizer's BOS unless ``add_bos_token=False``; Tessera's text shards (and ``--tasks``) have none."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from recipe_data import SMS

from launch.cli import main
from model import build_model
from model.config import ModelConfig
from model.io import copy_tokenizer_files, save_pretrained
from trainer.evaluation import continuation_logprobs, encode_pair

TASK_YAML = """task: tessera_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def records(count: int = 20) -> list[dict]:
    """Contexts of six words from SMS messages; four choices cut from other messages; a seeded label."""
    rng = random.Random(0)
    words = [line.split("\t", 1)[1].split() for line in SMS.read_text().splitlines()[:200]]
    return [{"query": " ".join(words[i][:6]), "gold": rng.randrange(4),
             "choices": [" ".join(rng.choice(words)[: rng.randint(1, 5)]) for _ in range(4)]} for i in range(count)]


@pytest.mark.slow
@torch.no_grad()
def test_lm_eval_hf_model_on_the_export_matches_tessera_eval_tasks(tmp_path, task_tokenizer, monkeypatch):
    pytest.importorskip("lm_eval")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "tiny-llama", "vocab_size": task_tokenizer.vocab_size, "d_model": 32,
                                 "n_heads": 2, "d_ff": 64}, "model")
    model = build_model(cfg).eval()
    ckpt = save_pretrained(model, tmp_path / "decoder")
    copy_tokenizer_files(task_tokenizer.path, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    items = records()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "datasets"))

    out = tmp_path / "ours.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", str(data), "--json", str(out)]) == 0
    ours = json.loads(out.read_text())
    peer = simple_evaluate(model=HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=8,
                                      add_bos_token=False),
                           tasks=["tessera_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                 include_defaults=False),
                           num_fewshot=0, log_samples=True)
    theirs = peer["results"]["tessera_mc"]
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # neither trivial nor the same argmax
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    assert (ours["acc_stderr"], ours["acc_norm_stderr"]) == pytest.approx(
        (theirs["acc_stderr,none"], theirs["acc_norm_stderr,none"]), rel=1e-9)

    samples = sorted(peer["samples"]["tessera_mc"], key=lambda s: s["doc_id"])
    peer_lls = [resp[0][0] for sample in samples for resp in sample["resps"]]
    pairs = [encode_pair(task_tokenizer, item["query"], " " + choice) for item in items for choice in item["choices"]]
    lls = continuation_logprobs(model, pairs, pad_id=task_tokenizer.pad_id)
    np.testing.assert_allclose(lls, peer_lls, rtol=1e-4, atol=1e-4)

    via_cli = tmp_path / "lm_eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--lm-eval", "tessera_mc", "--include-path",
                 str(tmp_path / "tasks"), "--json", str(via_cli)]) == 0
    harness = json.loads(via_cli.read_text())["lm_eval"]["tessera_mc"]
    assert (harness["acc"], harness["acc_norm"]) == (ours["acc"], ours["acc_norm"])
