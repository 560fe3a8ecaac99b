"""Gopher quality rules (Rae et al. 2021, appendix A1), datatrove's defaults."""

from __future__ import annotations

import dataclasses

from data.text import TextView

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
        text, words = doc.text, doc.plain_words
        n = len(words)
        if n < self.min_doc_words:
            return "gopher_short_doc"
        if n > self.max_doc_words:
            return "gopher_long_doc"
        mean = sum(map(len, words)) / n
        if mean < self.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if mean > self.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / n > self.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = doc.lines or [""]
        if sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > self.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > self.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        no_alpha = sum(1 for w in words if not w.isalpha() and not any(c.isalpha() for c in w))
        if (n - no_alpha) / n < self.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if sum(w in STOP_WORDS for w in doc.words) < self.min_stop_words:
            return "gopher_enough_stop_words"
        return None
