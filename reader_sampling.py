"""Which records an ImageReader draws (train mode): pure functions of the seed, run in the workers.

``ShuffleOrder`` (epochs without replacement over concatenated databases, at per-database weights) and
``RandomSampler`` (uniform with replacement, or class-balanced). See imagereader.py's docstring and the README.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_ORDER_KEY = 0x5EED0DE5                       # SeedSequence spawn-key tag of the shuffled epoch orders


def _quotas(sizes: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Samples each database contributes to one shuffled epoch of ``sizes.sum()`` samples."""
    total = int(sizes.sum())
    if weights is None:
        return sizes.astype(np.int64)
    exact = weights / weights.sum() * total
    quotas = np.floor(exact).astype(np.int64)
    remainder = total - int(quotas.sum())
    quotas[np.argsort(quotas - exact, kind="stable")[:remainder]] += 1  # largest remainders
    return quotas


class ShuffleOrder:
    """Shuffled epochs without replacement over concatenated databases, a pure function of the seed.

    Epoch ``e`` takes, from each database ``d``, the next ``quota[d]`` entries of that database's endless
    sequence of permutations (so each database is covered without replacement, at its weight), then
    shuffles the union. ``take(positions)`` maps stream positions to global record indices.
    """

    def __init__(self, sizes: Sequence[int], seed: int, weights: Sequence[float] | None = None):
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.seed = seed
        self.quotas = _quotas(self.sizes, None if weights is None else np.asarray(weights, np.float64))
        self.epoch_length = int(self.quotas.sum())
        self._cache: dict[int, np.ndarray] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_ORDER_KEY,) + key))

    def _database_sequence(self, db: int, start: int, stop: int) -> np.ndarray:
        n = int(self.sizes[db])
        cycles = range(start // n, (stop - 1) // n + 1)
        seq = np.concatenate([self._rng(1, db, c).permutation(n) for c in cycles])
        first = cycles[0] * n
        return seq[start - first : stop - first]

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            parts = [self.offsets[d] + self._database_sequence(d, e * q, (e + 1) * q)
                     for d, q in enumerate(self.quotas) if q > 0]
            order = np.concatenate(parts)
            self._rng(2, e).shuffle(order)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[e] = order
        return self._cache[e]

    def take(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(np.asarray(positions, np.int64), self.epoch_length)
        return np.array([self.epoch(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)


class RandomSampler:
    """With replacement (``balanced=False``) or class-balanced draws of global record indices."""

    def __init__(self, sizes: Sequence[int], class_records: Sequence[dict[int, Sequence[int]]] | None = None,
                 weights: Sequence[float] | None = None):
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.weights = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
        self.pools = None  # balanced: per database (or one merged) list of per-class index arrays
        if class_records is not None:
            per_db = [{c: self.offsets[d] + np.asarray(idx, np.int64) for c, idx in cr.items() if len(idx)}
                      for d, cr in enumerate(class_records)]
            if self.weights is None:
                merged: dict[int, list[np.ndarray]] = {}
                for pools in per_db:
                    for c, idx in pools.items():
                        merged.setdefault(c, []).append(idx)
                per_db = [{c: np.concatenate(v) for c, v in merged.items()}]
            self.pools = [[pools[c] for c in sorted(pools)] for pools in per_db]

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        out = np.empty(count, np.int64)
        for i in range(count):
            db = 0 if self.weights is None else int(rng.choice(len(self.weights), p=self.weights))
            if self.pools is None:
                lo, hi = (0, self.offsets[-1]) if self.weights is None else (self.offsets[db], self.offsets[db + 1])
                out[i] = rng.integers(lo, hi)
            else:
                pools = self.pools[db]
                pool = pools[int(rng.integers(len(pools)))]
                out[i] = pool[int(rng.integers(len(pool)))]
        return out
