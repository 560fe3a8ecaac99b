"""Text normalisation, the word splitter, and the per-document view the filters share (lines and
words are split once).

The splitter follows the spaCy English tokenizer that datatrove's filters use (``spacy.blank("en")``):
punctuation marks are tokens of their own (runs of dots or hyphens stay whole), numbers such as 3.14
and 1,000, URLs, initialisms (U.S.A., e.g.), single-capital initials and spaCy's abbreviations (Mr.,
Jan.) stay whole, and so do words where spaCy's infix rules find no cut (COVID-19, 9/11, Amazon.co.uk);
contractions split as spaCy splits them (do|n't, Peter|'s, I|'ll, can|not, but flay'd and on't whole).
It is one regular expression plus a look at words holding an apostrophe, not spaCy:
bench/filter_agreement.py measures how often the filters decide alike.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")

# datatrove's TERMINAL_PUNCTUATION (0.10): the marks that end a sentence, in every script.
TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965"
    "\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944"
    "\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c"
    "\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877"
    "\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e"
    "\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86"
    "\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1"
    "\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238"
    "\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9"
    "\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2"
    "\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d"
    "\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42"
    "\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38"
    "\U00016b44\U00016e98\U0001bc9f\U0001da88"
)
# datatrove's PUNCTUATION_SET: ASCII punctuation, control characters, typographic and CJK marks, the above.
PUNCTUATION = frozenset(
    string.punctuation + "«´»–—’“”„…∶━►、。〈〉《》「」【】！％（），．１：；？～"
    + "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))
) | TERMINAL_PUNCTUATION

# spaCy's English abbreviations that keep their period (single letters and dotted ones are matched apart).
_ABBREVIATIONS = (
    "Adm|Ak|Ala|Apr|Ariz|Ark|Aug|Bros|Calif|Co|Colo|Conn|Corp|Dec|Del|Dr|Feb|Fla|Ga|Gen|Gov|Ia|Id|Ill|Inc|"
    "Ind|Jan|Jr|Jul|Jun|Kan|Kans|Ky|La|Ltd|Mar|Mass|Md|Messrs|Mich|Minn|Miss|Mo|Mont|Mr|Mrs|Ms|Mt|Neb|Nebr|"
    "Nev|Nov|Oct|Okla|Ore|Pa|Ph\\.D|Prof|Rep|Rev|Sen|Sep|Sept|St|Tenn|Va|Wash|Wis|co|vs|v\\.s|[a-z]"
)
# spaCy's units (``spacy.lang.char_classes._units``): cut off a chunk that ends in digits and one of them.
_UNITS = "|".join(map(re.escape, [
    "km", "km²", "km³", "m", "m²", "m³", "dm", "dm²", "dm³", "cm", "cm²", "cm³", "mm", "mm²", "mm³", "ha", "µm",
    "nm", "yd", "in", "ft", "kg", "g", "mg", "µg", "t", "lb", "oz", "m/s", "km/h", "kmh", "mph", "hPa", "Pa",
    "mbar", "mb", "MB", "kb", "KB", "gb", "GB", "tb", "TB", "T", "G", "M", "K", "км", "км²", "км³", "м", "м²", "м³",
    "дм", "дм²", "дм³", "см", "см²", "см³", "мм", "мм²", "мм³", "нм", "кг", "г", "мг", "м/с", "км/ч", "кПа", "Па",
    "мбар", "Кб", "КБ", "кб", "Мб", "МБ", "мб", "Гб", "ГБ", "гб", "Тб", "ТБ"
]))
_UNIT = re.compile(rf"\d(?=(?:{_UNITS})(?![\w\-/]))")  # 30|mph, 100|m, B2|G: where spaCy cuts a unit off
_TOKEN_RULES = (
    r"(?:https?://|www\.)[^\s<>\"]*[^\s<>\"'.,;:!?)\]]"  # a URL, without the punctuation after it
    rf"|(?<!\w)(?=\w{{1,7}}\.)(?:(?:{_ABBREVIATIONS})\.|(?:[^\W\d_]\.){{2,}}|[A-Z]\.)(?![\w.])"  # Mr. U.S.A. J.
    r"|\d+(?:[.,:]\d+)+"  # 3.14, 1,000, 10:30
    # A word, going on where spaCy's infix rules find no cut: o'er, COVID-19, IL-3 (a hyphen is cut before a
    # letter or between digits), 84/100 (a slash before a letter), Amazon.co.uk (a dot before a capital), US$
    # (a currency sign after digits only), an@email. Possessive, so a word is scanned once.
    r"|\w++(?:['’]\w++|(?<=[^\W\d_])-\d\w*+|/\d\w*+|\.(?=[a-z])\w++|(?<=[^\W\d_])\$\w*+|@\w++)*+"
    r"|['’](?:[sS]|d|ll|re|ve|m|em|nuff|bout|[Cc](?:ause|os|oz|uz))\b"  # a contraction's end; 'em 'cause
    r"|\.{2,}|-{2,}"  # ellipses and dashes stay whole
    r"|[^\w\s]"  # any other mark on its own
)
# Most tokens are ASCII words that no rule above treats apart: nothing after them that could start a URL
# (``:`` after http, ``.`` after www), an abbreviation's period, or a word's going on. Matched first, they are
# what the rules would give (tests/data/test_text.py checks it on random text), a quarter faster.
_PLAIN_WORD = r"[A-Za-z]++(?![\w'’\-/.$@:])"
_TOKEN = re.compile(f"{_PLAIN_WORD}|{_TOKEN_RULES}")
# Where spaCy cuts a contraction: before 's after any word, before n't after a verb (do|n't, ca|n't), before
# 'd 'll 're 've 'm after a pronoun, and can|not (each stem in lower or title case). The pattern starts at
# the cut, so the search is fast; the word before it is checked in ``_cut``.
_CONTRACTION = re.compile(r"n(?=['’]t\b)|['’](?=[sS]\b|d\b|ll\b|re\b|ve\b|m\b)")
_CANNOT = re.compile(r"\b([Cc]an)(?=not\b)")
_PRONOUNS = frozenset(w for p in ("i", "you", "he", "she", "it", "we", "they", "who", "what", "when", "where", "why",
                                  "how", "there", "that", "this", "these", "those") for w in (p, p.title()))
_VERBS = frozenset(w for p in ("ai", "are", "ca", "could", "dare", "did", "do", "does", "had", "has", "have", "is",
                               "may", "might", "must", "need", "ought", "sha", "should", "was", "were", "wo", "would")
                   for w in (p, p.title()))
_WORD_BEFORE = re.compile(r"(?<!\w)\w{1,6}\Z")  # a whole word of at most 6 characters (the longest stem)


def _cut(match: re.Match[str]) -> str:
    """The contraction mark ``match`` found, with a space before it where spaCy cuts."""
    text, start, mark = match.string, match.start(), match.group()
    if start == 0 or not (text[start - 1].isalnum() or text[start - 1] == "_"):
        return mark
    if mark != "n" and text[start + 1] in "sS":
        return " " + mark
    word = _WORD_BEFORE.search(text, max(0, start - 7), start)
    stems = _VERBS if mark == "n" else _PRONOUNS
    return " " + mark if word is not None and word.group() in stems else mark


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode ``form`` (or none for ``""``), LF line ends, no control or zero-width characters,
    no trailing spaces on lines, no leading or trailing blank space."""
    if form:
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = _CONTROL.sub("", text)
    return _TRAILING_SPACE.sub("\n", text).strip()


def is_punctuation(token: str) -> bool:
    """Whether every character of ``token`` is punctuation (datatrove's test for a "symbol word")."""
    return PUNCTUATION.issuperset(token)


def split_words(text: str) -> list[str]:
    """Every token of ``text``, punctuation included, as spaCy's English tokenizer would cut it."""
    text = _UNIT.sub(r"\g<0> ", text)
    if "'" in text or "’" in text:
        text = _CONTRACTION.sub(_cut, text)
    if "annot" in text:
        text = _CANNOT.sub(r"\1 ", text)
    return _TOKEN.findall(text)


class TextView:
    """A document's text with its splits computed on first use and then shared."""

    def __init__(self, text: str) -> None:
        self.text = text

    @functools.cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @functools.cached_property
    def words(self) -> list[str]:
        """Every token, punctuation included."""
        return split_words(self.text)

    @functools.cached_property
    def plain_words(self) -> list[str]:
        """Tokens with a character that is not punctuation (most start with one: one lookup decides)."""
        return [w for w in self.words if w[0] not in PUNCTUATION or not is_punctuation(w)]

    def replace_text(self, text: str) -> None:
        """New text (a line filter kept only some lines): the cached splits are dropped."""
        self.text = text
        for name in ("lines", "words", "plain_words"):
            self.__dict__.pop(name, None)
