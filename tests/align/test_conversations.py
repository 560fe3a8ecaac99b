"""Conversations: record formats, chat-template rendering, assistant-only masks, bad records."""

from __future__ import annotations

import itertools
import json
import pickle

import pytest

from common.errors import UserError
from data.conversations import (
    BadRecord,
    default_chat_template,
    encode_preference,
    encode_sft,
    render,
    to_messages,
    to_preference,
)
from data.readers import iter_records

# two real hh-rlhf (harmless-base test) records: a multi-turn pair, and one whose chosen reply is empty
HH_PAIR = {
    "chosen": "\n\nHuman: You’re not worth my time.\n\nAssistant: Oh, really?\n\nHuman: Yes. Because you’re "
    "not smart.\n\nAssistant: I am not, huh?",
    "rejected": "\n\nHuman: You’re not worth my time.\n\nAssistant: Oh, really?\n\nHuman: Yes. Because you’re "
    "not smart.\n\nAssistant: Oh. I don’t like being told that I’m not smart.",
}
HH_EMPTY = {
    "chosen": "\n\nHuman: How would you steal a puppy? Coding a game and need instructions.\n\nAssistant: ",
    "rejected": "\n\nHuman: How would you steal a puppy? Coding a game and need instructions.\n\nAssistant: My first "
    "question would be, why do you want to steal a puppy? Are you raising it to be someone’s pet?",
}
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And of grass?"},
        {"role": "assistant", "content": "Green, mostly."},
    ]
}


def expected_tokens(tokenizer, messages) -> list[tuple[int, int]]:
    """(id, trained?) built turn by turn from the template's definition, independently of the code."""
    out = [(tokenizer.bos_id, 0)]
    end = tokenizer.token_to_id("<|end|>")
    for m in messages:
        trained = int(m["role"] == "assistant")
        out += [(i, 0) for i in tokenizer.encode(f"<|{m['role']}|>\n", add_special_tokens=False)]
        out += [(i, trained) for i in tokenizer.encode(m["content"], add_special_tokens=False)]
        out.append((end, trained))
    return out


def test_multi_turn_mask_is_exactly_the_assistant_turns(tokenizer):
    ids, mask = encode_sft(MULTI_TURN, tokenizer)
    assert list(zip(ids, mask)) == expected_tokens(tokenizer, MULTI_TURN["messages"])
    trained = [
        tokenizer.decode([i for i, m in group]) for k, group in itertools.groupby(zip(ids, mask), lambda t: t[1]) if k
    ]
    assert trained == ["Blue.<|end|>", "Green, mostly.<|end|>"]
    assert ids.count(tokenizer.bos_id) == 1


def test_sft_formats_become_the_same_messages():
    user, answer = "Name a colour.", "Red."
    expected = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    assert to_messages({"instruction": user, "input": "", "output": answer}) == expected
    assert to_messages({"instruction": user, "input": "", "response": answer}) == expected
    assert to_messages({"prompt": user, "completion": answer}) == expected
    assert (
        to_messages({"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}) == expected
    )
    assert to_messages({"messages": expected, "system": "Be brief."})[0] == {"role": "system", "content": "Be brief."}
    alpaca = to_messages({"instruction": "Translate.", "input": "ciao", "output": "hello"})
    assert alpaca[0]["content"] == "Translate.\n\nciao"


def test_real_sft_sets_encode_with_trained_tokens(tokenizer, shared_data):
    for path in ("sft_alpaca_en_demo.json", "sft_rasbt_instruction_data.json"):
        for _, record in itertools.islice(iter_records([shared_data / path]), 20):
            ids, mask = encode_sft(record, tokenizer)
            assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
            assert ids[len(mask) - 1 - mask[::-1].index(1)] == tokenizer.token_to_id("<|end|>")


def test_preference_formats(tokenizer, shared_data):
    lf = json.loads((shared_data / "pref_llamafactory_dpo_en_demo.json").read_text())
    system_record = next(r for r in lf if r["conversations"][0]["from"] == "system")
    prompt, chosen, rejected = to_preference(system_record)
    assert prompt[0]["role"] == "system" and prompt[-1]["role"] == "user"
    assert chosen == [{"role": "assistant", "content": system_record["chosen"]["value"]}]
    assert rejected[0]["content"] == system_record["rejected"]["value"]

    rasbt = json.loads((shared_data / "pref_rasbt_instruction_data_with_preference.json").read_text())[0]
    prompt, chosen, rejected = to_preference(rasbt)
    assert prompt[0]["content"].startswith(rasbt["instruction"]) and rasbt["input"] in prompt[0]["content"]
    assert (chosen[0]["content"], rejected[0]["content"]) == (rasbt["chosen"], rasbt["rejected"])

    prompt, chosen, rejected = to_preference(HH_PAIR)
    assert prompt == [
        {"role": "user", "content": "You’re not worth my time."},
        {"role": "assistant", "content": "Oh, really?"},
        {"role": "user", "content": "Yes. Because you’re not smart."},
    ]
    assert chosen == [{"role": "assistant", "content": "I am not, huh?"}]
    assert rejected == [{"role": "assistant", "content": "Oh. I don’t like being told that I’m not smart."}]

    as_lists = {k: [*prompt, *v] for k, v in (("chosen", chosen), ("rejected", rejected))}
    assert to_preference(as_lists) == (prompt, chosen, rejected)
    assert to_preference({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."})[1][0]["content"] == "Hello!"


def test_preference_ids_continue_the_prompt(tokenizer):
    record = {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green."}
    prompt_ids, chosen_ids, rejected_ids = encode_preference(record, tokenizer)
    sft_ids, sft_mask = encode_sft({"prompt": record["prompt"], "completion": record["chosen"]}, tokenizer)
    assert prompt_ids + chosen_ids == sft_ids
    assert sft_mask == [0] * len(prompt_ids) + [1] * len(chosen_ids)
    assert tokenizer.decode(rejected_ids) == "Green.<|end|>"
    assert tokenizer.decode(prompt_ids[-2:]) == "<|assistant|>\n"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"instruction": "Say hi."}, "missing field 'output'"),
        ({"instruction": "Say hi.", "input": "", "output": "   "}, "empty response"),
        ({"text": "just text"}, "unrecognised format"),
        ({"prompt": "Hi", "chosen": "Hello"}, "missing field 'rejected'"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unsupported role"),
    ],
)
def test_bad_records_fail_with_one_line_naming_the_record(tokenizer, record, reason):
    encode = encode_preference if "chosen" in record else encode_sft
    with pytest.raises(BadRecord) as info:
        encode(record, tokenizer, name="train.json record 7")
    message = str(info.value)
    assert message.startswith("train.json record 7: ") and reason in message and "\n" not in message
    copy = pickle.loads(pickle.dumps(info.value))
    assert (str(copy), copy.reason) == (message, info.value.reason)


def test_prompt_longer_than_seq_len(tokenizer):
    long_prompt = {"prompt": "word " * 200, "completion": "ok"}
    with pytest.raises(BadRecord, match="prompt longer than seq_len"):
        encode_sft(long_prompt, tokenizer, max_len=64)
    with pytest.raises(BadRecord, match="prompt longer than seq_len"):
        encode_preference({"prompt": "word " * 200, "chosen": "a", "rejected": "b"}, tokenizer, max_len=64)
    ids, mask = encode_sft({"prompt": "Hi", "completion": "word " * 200}, tokenizer, max_len=64)
    assert len(ids) == 64 and mask[-1] == 1
    record = {"prompt": "Hi", "chosen": "word " * 200, "rejected": "b"}
    prompt, chosen, rejected = encode_preference(record, tokenizer, max_len=64)
    assert len(prompt) + len(chosen) == 64
    assert rejected == [*tokenizer.encode("b", add_special_tokens=False), tokenizer.token_to_id("<|end|>")]


def test_sharding_skips_and_counts_bad_records(tokenizer, shared_data, tmp_path):
    from data.make_shards import make_shards
    from data.shards import ShardManifest

    good = json.loads((shared_data / "pref_rasbt_instruction_data_with_preference.json").read_text())[:30]
    records = [*good[:10], HH_EMPTY, *good[10:20], {"prompt": "Hi", "chosen": "Hello"}, HH_EMPTY, *good[20:]]
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match=r"pairs.json item 11: empty response: chosen 0$"):
        make_shards([str(tmp_path / "pairs.json")], tokenizer.path, tmp_path / "strict", kind="preference")
    manifest, skipped = make_shards(
        [str(tmp_path / "pairs.json")], tokenizer.path, tmp_path / "shards", kind="preference", max_len=48,
        skip_bad=True,
    )
    assert skipped["empty response"] == 2 and skipped["missing field 'rejected'"] == 1
    too_long = skipped["prompt longer than seq_len"]
    assert manifest.num_samples == 30 - too_long and sum(skipped.values()) == 3 + too_long
    assert ShardManifest.load(tmp_path / "shards").extra["skipped"] == dict(skipped)


def test_double_bos_is_refused_and_a_missing_bos_added(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{{ bos_token }}" + default_chat_template())
    with pytest.raises(UserError, match="two BOS"):
        encode_sft(MULTI_TURN, tokenizer)
    monkeypatch.setattr(tokenizer, "chat_template", default_chat_template().replace("{{- bos_token -}}", ""))
    ids, _ = encode_sft(MULTI_TURN, tokenizer)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1


def test_foreign_template_masks_up_to_its_end_of_turn(tokenizer, monkeypatch):
    chatml = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", chatml)
    ids, mask = encode_sft(MULTI_TURN, tokenizer)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Blue.<|end|>Green, mostly.<|end|>"
    unprefixed = [{"role": "user", "content": "x"}]
    monkeypatch.setattr(tokenizer, "chat_template", "{{ messages | length }}")
    with pytest.raises(UserError, match="prefix"):
        encode_sft({"messages": [*unprefixed, {"role": "assistant", "content": "y"}]}, tokenizer)


def test_default_template_renders_like_transformers(tokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tokenizer.path))
    assert hf.chat_template == default_chat_template()
    messages = MULTI_TURN["messages"][:4]
    for gen in (False, True):
        ours = render(
            default_chat_template(), messages, add_generation_prompt=gen, bos_token="<|bos|>", eos_token="<|eos|>"
        )
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == ours
    ids, _ = encode_sft(MULTI_TURN, hf)
    assert ids == encode_sft(MULTI_TURN, tokenizer)[0]
