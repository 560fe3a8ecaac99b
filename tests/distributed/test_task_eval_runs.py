"""train.eval_tasks: multiple-choice accuracy logged during a run. Under FSDP on 2 ranks (7 items, so
the ranks run different numbers of forwards and the short one pads with dummy ones) the logged
eval/<name>/acc and acc_norm equal `tessera eval --tasks` on the run's final checkpoint."""

from __future__ import annotations

import json
import random

from runs import tiny_config, train
from spawn import spawn

from launch.cli import main


def story_items(text: str, count: int = 7) -> list[dict]:
    """Eight words of a story, then its next four words among three random four-word pieces."""
    rng = random.Random(0)
    words = text.split()
    items = []
    for i in range(count):
        at = 40 * i
        right = " ".join(words[at + 8 : at + 12])
        wrong = [" ".join(words[j : j + 4]) for j in rng.sample(range(len(words) - 4), 3)]
        label = rng.randrange(4)
        items.append({"context": " ".join(words[at : at + 8]), "choices": [*wrong[:label], right, *wrong[label:]],
                      "label": label})
    return items


def test_eval_tasks_in_an_fsdp_run_equal_tessera_eval_tasks_on_its_checkpoint(corpus, tmp_path):
    tasks = tmp_path / "stories.jsonl"
    text = (corpus.valid.parent / "valid.txt").read_text()
    tasks.write_text("".join(json.dumps(item) + "\n" for item in story_items(text)))
    raw = tiny_config(corpus, tmp_path / "run", "train.strategy=fsdp", "train.max_steps=4", "train.eval_every=2",
                      f"train.eval_tasks=[{tasks}]")
    spawn(train, 2, raw)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "eval/stories/acc" in m]
    assert [m["step"] for m in logged] == [2, 4] and all("eval/loss" in m for m in logged)

    out = tmp_path / "tasks.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--tasks", str(tasks),
                 "--json", str(out)]) == 0
    ours = json.loads(out.read_text())
    assert ours["samples"] == 7
    assert (logged[-1]["eval/stories/acc"], logged[-1]["eval/stories/acc_norm"]) == (ours["acc"], ours["acc_norm"])
