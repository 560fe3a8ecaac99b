"""FineWeb's own quality rules (Penedo et al. 2024), datatrove's defaults (0.10): the lines are the
non-blank ones, and a line ends in punctuation when it ends in a sentence-ending mark (not a quote)."""

from __future__ import annotations

import dataclasses

from data.filters.gopher_repetition import find_duplicates
from data.text import TERMINAL_PUNCTUATION, TextView

STOP_CHARS = tuple(TERMINAL_PUNCTUATION)  # datatrove's default: quotes do not end a line


@dataclasses.dataclass
class FineWebFilter:
    name = "fineweb"
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    def __call__(self, doc: TextView) -> str | None:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        ratio = sum(line.endswith(STOP_CHARS) for line in lines) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        if find_duplicates(lines)[1] / max(len(text) - text.count("\n"), 1) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(len(doc.words), 1) > self.new_line_ratio:
            return "list_ratio"
        return None
