"""Prompt shards (`tessera shard --kind prompt`): rendered prompts for generation plus each whole
record, so the reward functions of online alignment see its answer and every other field."""

from __future__ import annotations

import json

import pytest

from common.errors import UserError
from data.collate import prompt_records
from data.config import DataConfig
from data.conversations import encode_prompt
from data.loader import build_loader
from data.make_shards import make_shards

RECORDS = [
    {"prompt": "What is 12+30?", "answer": "42", "difficulty": 2},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "answer": "red", "system": "Be brief."},
    {"messages": [{"role": "system", "content": "You add."}, {"role": "user", "content": "1+1"}],
     "answer": 2, "tags": ["easy"]},
]


def test_prompt_ends_with_the_assistant_header(tokenizer):
    ids, record = encode_prompt(RECORDS[0], tokenizer, name="r0")
    text = tokenizer.decode(ids)
    assert text.startswith(tokenizer.bos_token) and "What is 12+30?" in text
    assert text.endswith("<|assistant|>\n")
    assert json.loads(record) == ["r0", RECORDS[0]]
    system_ids, _ = encode_prompt(RECORDS[1], tokenizer)
    assert "<|system|>\nBe brief.<|end|><|user|>\nName a colour." in tokenizer.decode(system_ids)


@pytest.mark.parametrize(("record", "reason"), [
    ({"answer": "1"}, "unrecognised format"),
    ({"prompt": " ", "answer": "1"}, "empty user turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "prompt ends with an assistant turn"),
])
def test_bad_prompt_records_are_one_line_naming_the_record(tokenizer, record, reason):
    with pytest.raises(UserError, match=f"^data.jsonl record 3: {reason}") as caught:
        encode_prompt(record, tokenizer, name="data.jsonl record 3")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="prompt longer than max_len"):
        encode_prompt(RECORDS[0], tokenizer, max_len=4, name="r")


def test_prompt_shards_reach_the_loader_left_padded_with_their_records(tokenizer_dir, tokenizer, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    manifest, _ = make_shards([str(source)], tokenizer_dir, tmp_path / "shards", kind="prompt", num_workers=1)
    assert manifest.kind == "prompt" and manifest.num_samples == 3
    cfg = DataConfig(train=str(tmp_path / "shards"), valid=str(tmp_path / "shards"), seq_len=64, num_workers=0)
    [batch] = list(build_loader(cfg, objective="prompt", tokenizer=tokenizer, rank=0, world_size=1,
                                micro_batch_size=3, seed=0, split="valid"))
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding: every row ends at the column end
    assert (ids[mask == 0] == tokenizer.pad_id).all()
    for row, m, (name, record) in zip(ids, mask, prompt_records(batch)):
        expected, _ = encode_prompt(record, tokenizer)
        assert row[m.bool()].tolist() == expected
        assert name == f"{source}:{RECORDS.index(record) + 1}"
    assert sorted((r["answer"] for _, r in prompt_records(batch)), key=str) == [2, "42", "red"]
    assert {k for _, r in prompt_records(batch) for k in r} >= {"difficulty", "tags", "system"}


def test_prompt_shards_are_refused_by_other_objectives_and_vice_versa(tokenizer_dir, tokenizer, tmp_path,
                                                                       sft_shards):
    source = tmp_path / "prompts.json"
    source.write_text(json.dumps(RECORDS))
    make_shards([str(source)], tokenizer_dir, tmp_path / "shards", kind="prompt")
    kwargs = {"tokenizer": tokenizer, "rank": 0, "world_size": 1, "micro_batch_size": 2, "seed": 0}
    with pytest.raises(UserError, match=r"holds prompt shards; the sft objective needs sft shards"):
        build_loader(DataConfig(train=str(tmp_path / "shards")), objective="sft", **kwargs)
    with pytest.raises(UserError, match=r"the prompt objective needs prompt shards \(tessera shard --kind prompt\)"):
        build_loader(DataConfig(train=str(sft_shards)), objective="prompt", **kwargs)
