"""FineWeb's own quality rules (Penedo et al. 2024), datatrove's defaults."""

from __future__ import annotations

import dataclasses

from data.filters.gopher_repetition import find_duplicates
from data.text import TextView

STOP_CHARS = (".", "'", '"', "!", "?")


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
        lines = text.split("\n")
        ratio = sum(line.endswith(STOP_CHARS) for line in lines) / len(lines)
        if ratio <= self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) >= self.short_line_thr:
            return "short_line_ratio"
        chars = len(text) - text.count("\n")
        if find_duplicates([line for line in lines if line.strip()])[1] / max(chars, 1) >= self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(len(doc.words), 1) > self.new_line_ratio:
            return "list_ratio"
        return None
