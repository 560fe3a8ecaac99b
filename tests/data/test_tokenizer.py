import pytest

from common.errors import UserError
from data.conversations import render
from data.tokenizer import load_tokenizer, special_tokens, train_tokenizer

TEXTS = ["Once upon a time, a tiny robot named Zed (née Zedd) found 3.14 €... ✨",
         "  leading spaces\tand tabs\nnew lines\n\n", "日本語のテキストも大丈夫", ""]


def test_round_trip_and_special_ids(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("Hi", add_special_tokens=True)[0] == tokenizer.bos_id
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id) == (0, 1, 2, 4)
    assert len(tokenizer.sentinel_ids) == 16
    assert tokenizer.id_to_token(tokenizer.sentinel_ids[3]) == "<extra_id_3>"
    assert set(tokenizer.role_ids) == {"system", "user", "assistant", "end"}
    assert tokenizer.special_ids == set(range(len(special_tokens(16))))
    assert tokenizer.vocab_size == 700
    # special tokens in text are single tokens
    assert tokenizer.encode("<|user|>") == [tokenizer.role_ids["user"]]


def test_transformers_loads_it(tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = TEXTS[0]
    assert hf(text)["input_ids"] == [tokenizer.bos_id, *tokenizer.encode(text)]
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ours = render(tokenizer.chat_template, messages, add_generation_prompt=False, bos_token=tokenizer.bos_token,
                  eos_token=tokenizer.eos_token)
    assert hf.apply_chat_template(messages, tokenize=False) == ours
    assert ours.startswith("<|bos|><|user|>\nHi there<|end|>")


def test_unigram_round_trip(tmp_path, examples):
    texts = (examples / "pretrain_tinyshakespeare.txt").read_text().split("\n\n")[:400]
    tok = train_tokenizer(texts, tmp_path, vocab_size=500, model="unigram", num_sentinels=4)
    text = "First Citizen: Before we proceed any further, hear me speak. ünïcödé"
    assert tok.decode(tok.encode(text)) == text
    assert load_tokenizer(tmp_path).vocab_size == tok.vocab_size


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["some text"], tmp_path, vocab_size=50)
    with pytest.raises(UserError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="unknown tokenizer model"):
        train_tokenizer(["x"], tmp_path, vocab_size=500, model="wordpiece")


def test_whitespace_split_keeps_symbols_whole(tmp_path):
    lines = [f"IN: jump {d} twice OUT: I_TURN_{d.upper()} I_JUMP I_TURN_{d.upper()} I_JUMP"
             for d in ("left", "right")] * 50
    tok = train_tokenizer(lines, tmp_path, vocab_size=400, split="whitespace")
    ids = tok.encode("I_TURN_LEFT I_JUMP")
    assert [tok.decode([i]) for i in ids] == [" I_TURN_LEFT", " I_JUMP"]
    assert tok.decode(tok.encode("jump  left\ntwice")) == " jump  left\ntwice"  # spacing survives
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("I_TURN_LEFT I_JUMP", add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(UserError, match="unknown split 'words'"):
        train_tokenizer(lines, tmp_path / "bad", vocab_size=400, split="words")
