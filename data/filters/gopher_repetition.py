"""Gopher repetition rules (Rae et al. 2021, table A1), datatrove's defaults.

The n-gram rules count tuples of words instead of joining a string for every n-gram; the outcome is
datatrove's (same counts, same tie-breaking, same greedy skipping).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from data.text import TextView

PARAGRAPH = re.compile(r"\n{2,}")
LINES = re.compile(r"\n+")  # blank lines are not lines here (datatrove's split)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them), counting each repeat after the first."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


@dataclasses.dataclass
class GopherRepetitionFilter:
    name = "gopher_repetition"
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __call__(self, doc: TextView) -> str | None:
        text = doc.text
        size = max(len(text), 1)
        paragraphs = PARAGRAPH.split(text.strip())
        count, chars = find_duplicates(paragraphs)
        if count / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if chars / size > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = LINES.split(text)
        count, chars = find_duplicates(lines)
        if count / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if chars / size > self.dup_line_char_frac:
            return "dup_line_char_frac"
        words = doc.words
        if len(words) < 2:
            return None
        return self._ngram_rules(words, size)

    def _ngram_rules(self, words: list[str], size: int) -> str | None:
        """The n-gram rules over tuples of words (hashing a tuple reuses its strings' cached hashes,
        so no joined string is built). A repeated (n+1)-gram implies a repeated n-gram, so once an n
        has no repeat the larger ones are skipped."""
        top, dup = dict(self.top_n_grams), dict(self.dup_n_grams)
        repeats_possible = True
        for n in range(2, max([*top, *dup]) + 1):
            if len(words) < n or not (n in top or repeats_possible):
                break
            grams = list(zip(*(words[i:] for i in range(n))))
            if n in top:
                gram, count = Counter(grams).most_common(1)[0]
                if (sum(map(len, gram)) + n - 1) * count / size > top[n]:
                    return f"top_{n}_gram"
            if n in dup and repeats_possible:
                total = repeated_chars(grams, n)
                repeats_possible = total > 0
                if total / size > dup[n]:
                    return f"duplicated_{n}_n_grams"
        return None


def repeated_chars(grams: list[tuple[str, ...]], n: int) -> int:
    """datatrove's greedy count: walking the n-grams, a repeat adds its characters (words joined
    without spaces, as datatrove joins them) and skips n."""
    if len(set(grams)) == len(grams):
        return 0
    seen: set[tuple[str, ...]] = set()
    total = i = 0
    while i < len(grams):
        gram = grams[i]
        if gram in seen:
            total += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return total
