"""Gopher quality rules (Rae et al. 2021, appendix A1), datatrove's defaults.

As in datatrove, the word count and mean word length use the tokens that are not all punctuation, while
the symbol, alphabetic and stop-word rules count every token (a stop word counts once)."""

from __future__ import annotations

import dataclasses
import re

from data.text import TextView

LETTER = re.compile(r"[^\W\d_]")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


@dataclasses.dataclass
class GopherQualityFilter:
    name = "gopher_quality"
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2

    def __call__(self, doc: TextView) -> str | None:
        text, words, plain = doc.text, doc.words, doc.plain_words
        n = len(plain)
        if n < self.min_doc_words:
            return "gopher_short_doc"
        if n > self.max_doc_words:
            return "gopher_long_doc"
        mean = sum(map(len, plain)) / n
        if mean < self.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if mean > self.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / len(words) > self.max_symbol_word_ratio:  # per token, punctuation included
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / len(words) > self.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = doc.lines or [""]
        if sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > self.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > self.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if has_letter(words) / len(words) < self.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if len(STOP_WORDS.intersection(words)) < self.min_stop_words:  # distinct stop words
            return "gopher_enough_stop_words"
        return None


def has_letter(words: list[str]) -> int:
    """How many words have a letter (``LETTER``: what datatrove's alphabetic test finds). An all-alphabetic
    word has one, and most words are: ``str.isalpha`` answers them without the regular expression (every
    character ``isalpha`` accepts matches ``LETTER``: checked over all code points in the tests)."""
    return sum(1 for w in words if w.isalpha() or LETTER.search(w))
