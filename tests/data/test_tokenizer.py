import json

import pytest

from common.errors import UserError
from data.conversations import render
from data.readers import iter_documents
from data.tokenizer import load_tokenizer, special_tokens, train_tokenizer

TEXTS = ["Once upon a time, a tiny robot named Zed (née Zedd) found 3.14 €... ✨",
         "  leading spaces\tand tabs\nnew lines\n\n", "日本語のテキストも大丈夫", ""]
UNSEEN = "bytes no corpus here holds: \x00\x07\x7f Ελληνικά 🦜 \u200b\r\n"


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
    assert_transformers_agrees(tokenizer, tokenizer_dir)


def assert_transformers_agrees(tokenizer, tokenizer_dir):
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


def test_unigram_keeps_scan_words_whole(tmp_path, examples):
    """SCAN has 21 distinct words: each must be one piece (the stock trainer left most of them in characters)."""
    lines = (examples / "seq2seq_scan_simple_train_quarter.txt").read_text().splitlines()
    tok = train_tokenizer(lines, tmp_path, vocab_size=512, model="unigram", split="whitespace", num_sentinels=4)
    words = sorted({w for line in lines for w in line.split()})
    assert len(words) == 21
    assert {w: len(tok.encode(w)) for w in words} == dict.fromkeys(words, 1)
    assert sum(map(len, tok.encode_batch(lines))) / sum(len(line.split()) for line in lines) < 1.1
    assert tok.decode(tok.encode(lines[0])) == " " + lines[0]


def test_unigram_vocabulary_is_full_and_compresses_like_bpe(tmp_path, examples):
    texts = [d.text for d in iter_documents([examples / "pretrain_tinystories_valid_head.txt"])]
    unigram = train_tokenizer(texts, tmp_path / "unigram", vocab_size=4000, model="unigram", num_sentinels=16)
    bpe = train_tokenizer(texts, tmp_path / "bpe", vocab_size=4000, num_sentinels=16)
    assert unigram.vocab_size == 4000
    words = [w for t in texts for w in t.split()]
    per_word = {tok: sum(map(len, tok.encode_batch(texts))) / len(words) for tok in (unigram, bpe)}
    chars_per_word = sum(map(len, words)) / len(words)
    assert per_word[unigram] < 1.1 * per_word[bpe]
    assert per_word[unigram] < chars_per_word / 3
    pieces = [p for p, _ in json.loads((tmp_path / "unigram" / "tokenizer.json").read_text())["model"]["vocab"]]
    assert sum(len(p) > 1 for p in pieces[len(special_tokens(16)):]) > 3000
    for text in [*texts[:500], *TEXTS, UNSEEN]:
        assert unigram.decode(unigram.encode(text)) == text
    assert (unigram.pad_id, unigram.bos_id, unigram.eos_id, unigram.mask_id) == (0, 1, 2, 4)
    assert unigram.special_ids == set(range(len(special_tokens(16))))
    assert unigram.encode("<|user|>") == [unigram.role_ids["user"]]
    assert load_tokenizer(tmp_path / "unigram").vocab_size == 4000
    assert_transformers_agrees(unigram, tmp_path / "unigram")


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["some text"], tmp_path, vocab_size=50)
    with pytest.raises(UserError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="unknown tokenizer model"):
        train_tokenizer(["x"], tmp_path, vocab_size=500, model="sentencepiece")


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


def test_wordpiece_is_berts_and_transformers_loads_it(tmp_path, examples):
    from transformers import AutoTokenizer

    texts = [d.text for d in iter_documents([examples / "pretrain_tinystories_valid_head.txt"])]
    tok = train_tokenizer(texts, tmp_path / "wp", vocab_size=2000, model="wordpiece", num_sentinels=8)
    assert tok.vocab_size == 2000 and tok.mask_id == 4 and len(tok.sentinel_ids) == 8
    vocab = json.loads((tmp_path / "wp" / "tokenizer.json").read_text())["model"]["vocab"]
    assert sum(piece.startswith("##") for piece in vocab) > 100  # continuations, BERT's way
    sample = "Lily's Café was ÜBER-busy, so Mommy smiled!"
    pieces = [tok.id_to_token(i) for i in tok.encode(sample)]
    assert "lily" in pieces and "!" in pieces and all(p == p.lower() for p in pieces)  # lower-cased, split off
    assert tok.decode(tok.encode(sample)) == "lily ' s cafe was uber - busy, so mommy smiled!"  # normalised text
    hf = AutoTokenizer.from_pretrained(tmp_path / "wp")
    for text in [*texts[:50], sample]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode(text, add_special_tokens=True)
