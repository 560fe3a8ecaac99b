"""MinHash signatures against a plain reading of their definition, one shingle at a time in Python integers."""

from __future__ import annotations

import random

import numpy as np

from data.dedup import BLOCK, MinHashDedup, simplify

MASK = (1 << 64) - 1
MIX, BASE = 0x9E3779B97F4A7C15, 0x100000001B3


def plain_signature(m: MinHashDedup, text: str) -> list[int]:
    """The definition read plainly: a word's polynomial hash of its UTF-8 bytes, an n-gram's key folded
    from its words' hashes (the first n words of a shorter text; 0 for no words), per hash function the
    minimum of ``((a·key + b) mod 2^64) >> 32`` over every shingle, repeats included."""
    words = [sum(byte * pow(BASE, i, 1 << 64) for i, byte in enumerate(w.encode())) & MASK
             for w in simplify(text).split()]
    keys = []
    for start in range(max(len(words) - m.ngram + 1, 1 if words else 0)):
        key = 0
        for word in words[start : start + m.ngram]:
            key = ((key ^ word) * MIX) & MASK
            key ^= key >> 31
        keys.append(key)
    keys = keys or [0]
    return [min((((a * k + b) & MASK) >> 32) for k in keys) for a, b in zip(map(int, m._a), map(int, m._b))]


def test_signatures_equal_the_plain_reading_across_blocks_repeats_and_short_texts():
    """One batch with texts longer than a hashing block (their shingles span blocks), texts made of one
    shingle repeated, texts shorter than an n-gram, texts with no words, and neighbours with equal shingles."""
    rng = random.Random(0)
    vocabulary = ["river", "stone", "lamp", "Ärger", "naïve", "x", "of", "the", "a"]
    texts = [" ".join(rng.choices(vocabulary, k=rng.choice([3, 40, 200]))) for _ in range(30)]
    texts += [" ".join(rng.choices(vocabulary, k=BLOCK + 500)), "the river the river the river " * 50,
              "", "!!! ...", "lamp", "stone lamp of", " ".join(rng.choices(vocabulary, k=BLOCK // 3))]
    rng.shuffle(texts)
    texts += ["lamp", "lamp", "", ""]  # neighbours whose only shingle is the same
    m = MinHashDedup(bands=4, rows=3, seed=5)
    expected = np.array([plain_signature(m, t) for t in texts], np.uint32)
    assert (m.signatures(texts) == expected).all()
    assert (m.signatures(texts[:7]) == expected[:7]).all()  # a batch's other texts change nothing
