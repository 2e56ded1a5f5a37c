"""Stratified splits with a seed: the same seed and data give the same split, recorded in the run."""

from __future__ import annotations

import random
from collections import defaultdict


def stratified_split(labels: list[str], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Indices per split, e.g. fractions={"val": 0.1, "test": 0.1}; the rest goes to "train".

    Every class keeps at least one example in train; a class with n examples gives round(n * f) to each split,
    so small classes stay represented in proportion.
    """
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    out: dict[str, list[int]] = {"train": [], **{k: [] for k in fractions}}
    rng = random.Random(seed)
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        start = 0
        for split, frac in fractions.items():
            take = min(round(len(idx) * frac), len(idx) - start - 1)
            out[split].extend(idx[start:start + max(0, take)])
            start += max(0, take)
        out["train"].extend(idx[start:])
    return {k: sorted(v) for k, v in out.items()}
