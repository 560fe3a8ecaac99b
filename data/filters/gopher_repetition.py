"""Gopher repetition rules (Rae et al. 2021, table A1), datatrove's defaults.

The n-gram rules give every n-gram an exact integer id (numpy) instead of joining a string for every
n-gram; the outcome is datatrove's (same counts, same tie-breaking, same greedy skipping).
"""

from __future__ import annotations

import bisect
import dataclasses
import re

import numpy as np

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
        blank_line = "\n\n" in text  # without one, the splits are one paragraph and plain lines
        paragraphs = PARAGRAPH.split(text.strip()) if blank_line else [text.strip()]
        count, chars = find_duplicates(paragraphs)
        if count / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if chars / size > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = LINES.split(text) if blank_line else text.split("\n")
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
        """The n-gram rules over exact integer ids of the n-grams (numpy: each n's ids come from the
        (n-1)-grams' and the next word's). A repeated (n+1)-gram is made of repeated n-grams, so the
        characters of the words that repeated n-grams cover bound every larger n's duplicated characters:
        once that bound is under a rule's threshold, the rule's greedy walk is skipped, and once it is
        under every larger n's, so are those n (with no top rule left)."""
        top, dup = dict(self.top_n_grams), dict(self.dup_n_grams)
        vocabulary: dict[str, int] = {}  # word → id, in order of first occurrence
        word_ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in words], np.int64)
        chars = np.zeros(len(words) + 1, np.int64)  # the words' characters, prefix sums
        np.cumsum(np.fromiter(map(len, words), np.int64, len(words)), out=chars[1:])
        grams = word_ids
        for n in range(2, max([*top, *dup]) + 1):
            if len(words) < n:
                break
            keys = grams[:-1] * len(vocabulary) + word_ids[n - 1:]  # exact: ids are below len(words)
            _, first, grams = np.unique(keys, return_index=True, return_inverse=True)
            if n in top:
                counts = np.bincount(grams)
                most = counts.max()
                at = first[counts == most].min()  # Counter.most_common's pick: the first seen of the most frequent
                if (chars[at + n] - chars[at] + n - 1) * most / size > top[n]:
                    return f"top_{n}_gram"
            if n in dup:
                repeats = np.flatnonzero(first[grams] < np.arange(len(grams)))  # n-gram seen before
                bound = covered_chars(repeats, chars, n) / size
                if bound > dup[n] and repeated_chars(repeats, grams, first, chars, n) / size > dup[n]:
                    return f"duplicated_{n}_n_grams"
                if max(top, default=0) <= n and all(bound <= dup[m] for m in dup if m > n):
                    break
        return None


def covered_chars(starts: np.ndarray, chars: np.ndarray, n: int) -> int:
    """Characters of the words that the n-grams at ``starts`` cover (each word once): at least what
    :func:`repeated_chars` counts for them, since its repeats are some of those n-grams, none overlapping."""
    depth = np.zeros(len(chars), np.int64)
    depth[starts] += 1
    depth[starts + n] -= 1
    covered = np.cumsum(depth[:-1]) > 0
    return int(np.diff(chars)[covered].sum())


def repeated_chars(candidates: np.ndarray, grams: np.ndarray, first: np.ndarray, chars: np.ndarray, n: int) -> int:
    """datatrove's greedy count: walking the n-grams (ids ``grams``, each first seen at ``first[id]``), a
    repeat adds its characters (words joined without spaces, as datatrove joins them) and skips n.

    Only the positions whose n-gram occurred before (``candidates``, ascending) can be repeats, so only
    they are walked: one is a repeat unless skipped itself, when an earlier occurrence was walked (the first
    occurrence, unless a repeat skipped it, or an earlier walked one of these positions)."""
    repeats: list[int] = []  # walked positions that were repeats; each skips the n - 1 after it
    walked: set[int] = set()  # n-grams of walked candidate positions that were not repeats
    total, skipped_to = 0, -1
    for at, gram, first_at in zip(candidates.tolist(), grams[candidates].tolist(), first[grams[candidates]].tolist()):
        if at <= skipped_to:
            continue
        before = bisect.bisect_left(repeats, first_at) - 1  # the last repeat before the first occurrence
        if gram in walked or before < 0 or first_at > repeats[before] + n - 1:
            total += int(chars[at + n] - chars[at])
            repeats.append(at)
            skipped_to = at + n - 1
        else:
            walked.add(gram)
    return total
