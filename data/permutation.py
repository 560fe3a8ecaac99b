"""Seeded permutations of ``[0, n)`` computed element by element, with no table: the epoch order of
billions of samples costs no memory (a table of ``n`` int32 would cost 4 bytes a sample per rank).

A 4-round Feistel network (Luby–Rackoff: a pseudorandom permutation from 3 rounds on) with
splitmix64's finaliser as round function permutes the ``b``-bit values, ``2**b`` the smallest
power of two ≥ ``n`` (halves of ``b // 2`` and ``b - b // 2`` bits, whose widths swap each round);
a value that lands outside ``[0, n)`` is encrypted again until it is inside ("cycle walking", as
format-preserving encryption does): still a bijection of ``[0, n)``, under 2 encryptions on average
since ``2**b < 2·n``, none when ``n`` is a power of two. numpy throughout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROUNDS = 4
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64: a well-spread hash of each value."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def seed_key(seed: Any) -> int:
    """A 64-bit key from anything ``np.random.default_rng`` takes as a seed."""
    return int(np.random.default_rng(seed).integers(0, 2**63))


def subkeys(key: int, index: np.ndarray) -> np.ndarray:
    """One key per ``index`` (e.g. per shuffle window) derived from ``key``."""
    return mix(np.uint64(key) + (np.asarray(index, np.uint64).reshape(-1) + np.uint64(1)) * _GOLDEN)


def permute(x: Any, n: Any, key: Any) -> np.ndarray:
    """The image of each ``x`` (``0 <= x < n``) under the permutation of ``[0, n)`` keyed by ``key``;
    ``n`` and ``key`` are scalars or arrays the shape of ``x`` (one permutation per element)."""
    shape = np.shape(x)
    x = np.asarray(x, np.uint64).reshape(-1)
    scalar = np.ndim(n) == 0 and np.ndim(key) == 0
    n = np.asarray(n, np.uint64).reshape(-1)
    bits = np.frexp(np.maximum(n, np.uint64(1)) - np.uint64(1))[1].astype(np.uint64)  # bit length of n - 1
    if (x >= n).any():  # cycle walking would never end
        raise ValueError(f"permute: a value is not below n ({int(x.max())} >= {int(n.min())})")
    rounds = [mix(np.asarray(key, np.uint64).reshape(-1) + np.uint64(r)) for r in range(ROUNDS)]
    if not scalar:
        n, bits = np.broadcast_to(n, x.shape), np.broadcast_to(bits, x.shape)
        rounds = [np.broadcast_to(k, x.shape) for k in rounds]
    out = _encrypt(x, bits, rounds)
    todo = np.flatnonzero(out >= n)
    while len(todo):  # cycle walking
        if scalar:
            out[todo] = _encrypt(out[todo], bits, rounds)
            todo = todo[out[todo] >= n]
        else:
            out[todo] = _encrypt(out[todo], bits[todo], [k[todo] for k in rounds])
            todo = todo[out[todo] >= n[todo]]
    return out.astype(np.int64).reshape(shape)


def _encrypt(value: np.ndarray, bits: np.ndarray, rounds: list[np.ndarray]) -> np.ndarray:
    """One pass of the unbalanced Feistel network over ``bits``-bit values (an even number of rounds,
    so the halves end at the widths they started with)."""
    one = np.uint64(1)
    low = bits >> one
    high = bits - low
    widths = [(high, low), (low, high)]  # (left, right) bits before an even / odd round
    left, right = value >> low, value & ((one << low) - one)
    for r, key in enumerate(rounds):
        left_bits = widths[r % 2][0]
        left, right = right, left ^ (mix(right ^ key) & ((one << left_bits) - one))
    return (left << low) | right


class Permutation:
    """``permute(·, n, key)`` as a read-only integer sequence: ``p[i]``, ``p[slice]``, ``p[array]``,
    ``len(p)``, ``np.asarray(p)`` (which builds the whole table: for tests and small ``n``)."""

    def __init__(self, n: int, key: int) -> None:
        self.n, self.key = int(n), int(key)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            index = np.arange(self.n)[index]
        out = permute(index, self.n, self.key)
        return int(out) if out.ndim == 0 else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[np.arange(self.n)].astype(dtype or np.int64)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()
