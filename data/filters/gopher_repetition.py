"""Gopher repetition rules (Rae et al. 2021, table A1), datatrove's defaults.

The n-gram rules work on integer word ids hashed into 64-bit n-gram keys with numpy, instead of
joining strings for every n; the outcome is datatrove's (same counts, same greedy skipping).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np

from data.text import TextView

PARAGRAPH = re.compile(r"\n{2,}")
_MIX = np.uint64(0x9E3779B97F4A7C15)


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
        lines = doc.lines or [""]
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
        """The n-gram rules with n-gram keys built incrementally (n from n-1) over integer word ids.
        A repeated (n+1)-gram implies a repeated n-gram, so once an n has none the larger are skipped."""
        vocabulary: dict[str, int] = {}
        ids = np.fromiter((vocabulary.setdefault(w, len(vocabulary) + 1) for w in words), np.uint64, len(words))
        cumulative = np.concatenate([[0], np.cumsum(np.fromiter(map(len, words), np.int64, len(words)))])
        top, dup = dict(self.top_n_grams), dict(self.dup_n_grams)
        with np.errstate(over="ignore"):
            keys = ids * _MIX
        repeats_possible = True
        for n in range(2, max([*top, *dup]) + 1):
            if len(words) < n or not (n in top or repeats_possible):
                break
            with np.errstate(over="ignore"):
                keys = (keys[:-1] ^ ids[n - 1 :]) * _MIX
                keys ^= keys >> np.uint64(29)
            chars = cumulative[n:] - cumulative[:-n]
            key_list = keys.tolist()
            if n in top:
                key, count = Counter(key_list).most_common(1)[0]
                if (int(chars[key_list.index(key)]) + n - 1) * count / size > top[n]:
                    return f"top_{n}_gram"
            if n in dup and repeats_possible:
                total = repeated_chars(key_list, chars.tolist(), n)
                repeats_possible = total > 0
                if total / size > dup[n]:
                    return f"duplicated_{n}_n_grams"
        return None


def repeated_chars(keys: list[int], chars: list[int], n: int) -> int:
    """datatrove's greedy count: walking the n-grams, a repeat adds its characters (words joined
    without spaces, as datatrove joins them) and skips n."""
    if len(set(keys)) == len(keys):
        return 0
    seen: set[int] = set()
    total = i = 0
    while i < len(keys):
        key = keys[i]
        if key in seen:
            total += chars[i]
            i += n
        else:
            seen.add(key)
            i += 1
    return total
