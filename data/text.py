"""Text normalisation and the per-document view the filters share: lines and words are split once.

Word splitting is a regular expression that approximates the tokenizers datatrove uses (words,
numbers and contractions stay whole; runs of punctuation are their own tokens). datatrove redoes
a spaCy/NLTK split inside every filter; sharing one split is most of our speed.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
PUNCTUATION = frozenset(string.punctuation + "–—‘’“”«»…•·¡¿")


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode ``form`` (or none for ``""``), LF line ends, no control or zero-width characters,
    no trailing spaces on lines, no leading or trailing blank space."""
    if form:
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = _CONTROL.sub("", text)
    return _TRAILING_SPACE.sub("\n", text).strip()


def is_punctuation(token: str) -> bool:
    return all(c in PUNCTUATION for c in token)


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
        return _WORD.findall(self.text)

    @functools.cached_property
    def plain_words(self) -> list[str]:
        """Tokens that are not only punctuation (word tokens are kept whole; symbol runs are
        checked against the punctuation set)."""
        return [w for w in self.words if w[0].isalnum() or w[0] == "_" or not is_punctuation(w)]

    def replace_text(self, text: str) -> None:
        """New text (a line filter kept only some lines): the cached splits are dropped."""
        self.text = text
        for name in ("lines", "words", "plain_words"):
            self.__dict__.pop(name, None)
