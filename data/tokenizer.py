"""Tokenizer training and loading: Hugging Face ``tokenizers`` saved in the layout transformers loads.

Byte-level BPE by default (Unigram as an option, over the same byte alphabet so every string
round-trips), or BERT's WordPiece (its normaliser: lower case, accents stripped, Chinese characters
apart; ``##`` marks a word's continuation; decoding gives the normalised text, not the original).
The special tokens come first, so their ids are stable and small:
``<|pad|>=0 <|bos|>=1 <|eos|>=2 <|unk|>=3 <|mask|>=4``, then the chat roles ``<|system|> <|user|>
<|assistant|> <|end|>``, then the T5 sentinels ``<extra_id_0>..<extra_id_{N-1}>``. Everything the
rest of Tessera needs goes through :class:`TessTokenizer` (``load_tokenizer(dir)``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from common.errors import UserError
from data.conversations import default_chat_template

PAD, BOS, EOS, UNK, MASK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|mask|>"
ROLES = ("system", "user", "assistant", "end")
MODELS = ("bpe", "unigram", "wordpiece")
DEFAULT_SENTINELS = 32
LONG_TEXT_CHARS = 1 << 16  # longer texts are encoded in pieces of about this size (TessTokenizer.pieces)
PIECES_PER_BATCH = 16
PIECE_BOUNDARY = re.compile(r"(?<=\S) (?=\S)")


def special_tokens(num_sentinels: int = DEFAULT_SENTINELS) -> list[str]:
    """All special tokens in id order."""
    return [PAD, BOS, EOS, UNK, MASK, *(f"<|{r}|>" for r in ROLES), *(f"<extra_id_{i}>" for i in range(num_sentinels))]


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    model: str = "bpe",
    num_sentinels: int = DEFAULT_SENTINELS,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    split: str = "gpt2",
) -> TessTokenizer:
    """Train on ``texts`` and save ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``.

    ``split`` is how text is cut into words before merging: ``gpt2`` (GPT-2's regex: letters,
    digits and punctuation apart) or ``whitespace`` (only at spaces, every word with a leading space,
    so symbols like ``I_TURN_RIGHT`` can become one token; decoding then starts with a space).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = special_tokens(num_sentinels)
    if model not in MODELS:
        raise UserError(f"unknown tokenizer model {model!r}; choose from {', '.join(MODELS)}")
    if model == "wordpiece":
        return _train_wordpiece(texts, Path(out_dir), vocab_size=vocab_size, specials=specials,
                                min_frequency=min_frequency, model_max_length=model_max_length,
                                num_sentinels=num_sentinels)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet) + 1:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: {len(specials)} special tokens and "
            f"{len(alphabet)} byte symbols need at least {len(specials) + len(alphabet) + 1}"
        )
    tok = Tokenizer(models.BPE() if model == "bpe" else models.Unigram())
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "whitespace":
        tok.normalizer = normalizers.Prepend(" ")  # the first word gets the same token as any other
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\s?\S+|\s+"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise UserError(f"unknown split {split!r}; choose from gpt2, whitespace")
    tok.decoder = decoders.ByteLevel()
    if model == "bpe":
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=alphabet, show_progress=False,
        )
        texts = _NonEmpty(texts)
        tok.train_from_iterator(texts, trainer)
    else:
        texts = _NonEmpty(texts)
        _train_unigram(tok, texts, vocab_size=vocab_size, specials=specials)
    if not texts.count or tok.get_vocab_size() <= len(specials):
        raise UserError("the tokenizer saw no text to train on: the inputs are empty (or only whitespace)")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return _save(tok, Path(out_dir), specials, model_max_length,
                 {"model": model, "num_sentinels": num_sentinels, "split": split})


def _train_wordpiece(texts: Iterable[str], out: Path, *, vocab_size: int, specials: list[str], min_frequency: int,
                     model_max_length: int, num_sentinels: int) -> TessTokenizer:
    """BERT's WordPiece (``bert-base-uncased``'s normaliser and pre-tokenizer), our special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < len(specials) + 2:
        raise UserError(f"--vocab-size {vocab_size} is too small for {len(specials)} special tokens and an alphabet")
    tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                        continuing_subword_prefix="##", show_progress=False)
    texts = _NonEmpty(texts)
    tok.train_from_iterator(texts, trainer)
    if not texts.count or tok.get_vocab_size() <= len(specials):
        raise UserError("the tokenizer saw no text to train on: the inputs are empty (or only whitespace)")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return _save(tok, out, specials, model_max_length, {"model": "wordpiece", "num_sentinels": num_sentinels})


def _save(tok: Any, out: Path, specials: list[str], model_max_length: int, tessera: dict[str, Any]) -> TessTokenizer:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as transformers reads them."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "mask_token": MASK,
        "additional_special_tokens": specials[5:],
        "chat_template": default_chat_template(),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "tessera": tessera,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token",
                                "additional_special_tokens")}, indent=2) + "\n")
    return load_tokenizer(out)


class TessTokenizer:
    """The tokenizer as the trainer, generation, SFT and alignment use it.

    ``encode`` adds no special tokens unless asked (then a BOS in front, as transformers does with
    this tokenizer). ``chat_template``, ``bos_token`` and ``eos_token`` make it a
    :class:`data.conversations.ChatTokenizer`.
    """

    def __init__(self, path: Path, tok: Any, config: dict[str, Any]) -> None:
        self.path = path
        self._tok = tok
        self.chat_template: str = config.get("chat_template") or default_chat_template()
        self.bos_token, self.eos_token = config.get("bos_token", BOS), config.get("eos_token", EOS)
        self.pad_token, self.mask_token = config.get("pad_token", PAD), config.get("mask_token", MASK)
        self.bos_id = self._require(self.bos_token)
        self.eos_id = self._require(self.eos_token)
        self.pad_id = self._require(self.pad_token)
        self.mask_id = self._require(self.mask_token)
        self.unk_id: int | None = tok.token_to_id(config.get("unk_token", UNK))
        self.role_ids: dict[str, int] = {r: self._require(f"<|{r}|>") for r in ROLES}
        self.sentinel_ids: list[int] = []
        while (sid := tok.token_to_id(f"<extra_id_{len(self.sentinel_ids)}>")) is not None:
            self.sentinel_ids.append(sid)
        self.vocab_size: int = tok.get_vocab_size()
        self.special_ids: frozenset[int] = frozenset(
            tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values() if t.special
        )
        self.sha256: str = hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest()
        # long texts may be cut into pieces only where the word split is known: Tessera's gpt2 split
        # (the whitespace split prepends a space to every segment between special tokens)
        self.cut_long: bool = (config.get("tessera") or {}).get("split") == "gpt2"

    def _require(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise UserError(f"{self.path}: the tokenizer has no {token} token; train it with `tessera tokenizer train`")
        return tid

    @property
    def end_id(self) -> int:
        """``<|end|>``: closes every chat turn; generation stops on it for chat models."""
        return self.role_ids["end"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Ids of every text. A text over ``LONG_TEXT_CHARS`` is encoded in pieces (Tessera's own
        tokenizers; see :meth:`pieces`): tokenizers keeps ~300 bytes of bookkeeping per token while it
        encodes, so one 5 MB line took 1.3 GB at once; the ids are the same as for the whole text."""
        long = [len(t) > LONG_TEXT_CHARS and self.cut_long and not add_special_tokens for t in texts]
        if not any(long):
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
        short = iter(self.encode_batch([t for t, is_long in zip(texts, long) if not is_long], add_special_tokens))
        out = []
        for text, is_long in zip(texts, long):
            if not is_long:
                out.append(next(short))
                continue
            pieces, ids = self.pieces(text), []
            for k in range(0, len(pieces), PIECES_PER_BATCH):
                for encoding in self._tok.encode_batch(pieces[k : k + PIECES_PER_BATCH], add_special_tokens=False):
                    ids += encoding.ids
            out.append(ids)
        return out

    def pieces(self, text: str) -> list[str]:
        """``text`` cut every ~``LONG_TEXT_CHARS`` before a single space between two non-space
        characters: GPT-2's word regex never matches across one (a word takes its space in front), so
        every piece starts a word and the words, and so the ids, are those of the whole text."""
        out, start = [], 0
        while len(text) - start > LONG_TEXT_CHARS:
            match = PIECE_BOUNDARY.search(text, start + LONG_TEXT_CHARS)
            if match is None:
                break
            out.append(text[start : match.start()])
            start = match.start()
        return [*out, text[start:]]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(path: str | Path) -> TessTokenizer:
    """Load a directory written by :func:`train_tokenizer` (or any with tokenizer.json + config)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    file = path / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"no tokenizer at {path}: expected {file} (make one with `tessera tokenizer train`)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise UserError(f"{file}: not a valid tokenizers file ({exc})") from None
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return TessTokenizer(path, tok, config)


def tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json (empty when absent), special tokens as plain strings (not AddedToken dicts)."""
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v.get("content") if isinstance(v, dict) and k.endswith("_token") else v for k, v in config.items()}


def special_ids(tokenizer: Any, config: dict) -> dict[str, int]:
    """bos / eos / pad (named by tokenizer_config.json) and ``<|end|>`` ids that the vocabulary has: for
    any tokenizers file (Tessera's or an imported model's), where :class:`TessTokenizer` requires them all."""
    out = {}
    for key in ("bos", "eos", "pad"):
        token = config.get(f"{key}_token")
        if token and tokenizer.token_to_id(token) is not None:
            out[key] = tokenizer.token_to_id(token)
    if tokenizer.token_to_id("<|end|>") is not None:
        out["end"] = tokenizer.token_to_id("<|end|>")
    return out


def stop_ids(special: dict[str, int]) -> list[int]:
    """The ids decoding stops at: EOS, and ``<|end|>`` (a chat turn's close) when the vocabulary has it."""
    return [special[k] for k in ("eos", "end") if k in special]


# Two characters no byte-level word can hold (ByteLevel maps every byte to a printable one).
_SEPARATOR, _AGAIN = "\0", "\1"


def _train_unigram(tok: Any, texts: Iterable[str], *, vocab_size: int, specials: list[str]) -> None:
    """Fit a Unigram model on the words ``tok`` cuts ``texts`` into and install it as ``tok.model``.

    ``UnigramTrainer`` takes its seed pieces from a suffix array over the *distinct* words, keeping only
    substrings that recur followed by different characters: a whole word is a seed only where it also
    occurs inside other words, however frequent it is (on SCAN's 21 words the vocabulary stayed near
    characters). sentencepiece builds that array over sentences, where frequent words recur. So each word
    goes to the trainer as one sentence holding it twice: ``w<0>w<1>`` if seen twice or more (``w`` recurs
    followed by the trainer's separator ``<0>`` and by ``<1>``: a seed), ``w<0>w`` if seen once (not a seed,
    as in sentencepiece); ``<0>``/``<1>`` are the characters ``\\x00``/``\\x01``. No seed can span ``<0>`` (the
    trainer drops those) or ``<1>`` (always followed by ``<0>``); every count is doubled alike. Both characters
    are dropped from the vocabulary afterwards (asked for two more pieces so the size comes out right).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words: Counter[str] = Counter()
    for text in texts:
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        words.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    if not words:
        raise UserError("the tokenizer saw no text to train on; check the input files")
    sentences = (f"{w}{_SEPARATOR}{w}{_AGAIN if n > 1 else ''}" for w, n in words.items() for _ in range(n))
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size + 2, special_tokens=specials, unk_token=UNK,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    fitted = Tokenizer(models.Unigram())  # no normalizer or pre-tokenizer: each string is one sentence
    fitted.train_from_iterator(sentences, trainer)
    pieces = json.loads(fitted.to_str())["model"]["vocab"]
    tok.model = models.Unigram([(p, s) for p, s in pieces if p not in (_SEPARATOR, _AGAIN)], specials.index(UNK))
    tok.add_special_tokens(specials)


class _NonEmpty:
    """The texts that hold more than whitespace, counted as they pass (a tokenizer of nothing is refused)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if text and not text.isspace():
                self.count += 1
                yield text
