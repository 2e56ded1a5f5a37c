"""Splitting interactions for evaluation the way recommender research does, and the per-user lists built from them.

    part, cold = split_interactions(users, items, times, "random", (0.8, 0.1, 0.1), cold_frac=0.05, seed=0)
    # part[i]: TRAIN, VALID, TEST, or COLD (an interaction with an item held out of training)

random (RecBole's default, "RS" with random order, grouped by user): each user's interactions in a random order,
split by the ratios; valid and test get floor(ratio * n) each, and a user with too few for that still gives one to
test, then one to valid, while more than one stays in train.
leave_last_out (the sequential protocol): each user's interactions in time order (file order breaks ties); the last
is the test, the one before it the validation, the rest train. Two interactions: train and test; one: train.
cold items: `cold_frac` of the items that have interactions, drawn with the seed, give all their interactions to
the cold slice before the split, so no model trains on them; only an item's text can bring it up.
"""

from __future__ import annotations

import numpy as np

TRAIN, VALID, TEST, COLD = 0, 1, 2, 3
PARTS = {"train": TRAIN, "valid": VALID, "test": TEST, "cold": COLD}


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by `keys`: (position of each row within its group, size of its group)."""
    n = len(keys)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), sizes)
    return np.arange(n) - starts[group], sizes[group]


def _by_ratio(size: np.ndarray, ratios: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(train count, valid count) per row's group; test takes the rest."""
    n = size.astype(np.float64)
    valid, test = np.floor(ratios[1] * n).astype(np.int64), np.floor(ratios[2] * n).astype(np.int64)
    train = size - valid - test
    for count, r in ((test, ratios[2]), (valid, ratios[1])):  # a share below one row still gets one, test first
        extra = (train > 1) & (r * n > 0) & (r * n < 1)
        count += extra
        train -= extra
    return train, valid


def split_interactions(users: np.ndarray, items: np.ndarray, times: np.ndarray | None, protocol: str,
                       ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), cold_frac: float = 0.0,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(part of each interaction, the cold items). Deterministic for a seed."""
    if protocol not in ("random", "leave_last_out"):
        raise ValueError(f"split {protocol!r}: expected random or leave_last_out")
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"split_ratios {tuple(ratios)}: expected three shares (train, valid, test) summing to 1")
    if not 0 <= cold_frac < 1:
        raise ValueError(f"cold_items {cold_frac}: expected a fraction from 0 to below 1")
    rng = np.random.default_rng(seed)
    part = np.full(len(users), TRAIN, np.int8)
    cold = np.zeros(0, np.int64)
    if cold_frac > 0:
        interacted = np.unique(items)
        cold = np.sort(rng.choice(interacted, int(round(cold_frac * len(interacted))), replace=False))
        part[np.isin(items, cold)] = COLD
    warm = np.flatnonzero(part != COLD)
    if protocol == "random":
        within = rng.permutation(len(warm))  # a random order inside each user
    else:
        within = np.lexsort((warm, times[warm])) if times is not None else np.arange(len(warm))
        within = np.argsort(within, kind="stable")  # rank in time order
    rows = warm[np.lexsort((within, users[warm]))]
    pos, size = _groups(users[rows])
    if protocol == "random":
        n_train, n_valid = _by_ratio(size, ratios)
    else:
        n_train = np.where(size >= 3, size - 2, 1)
        n_valid = np.where(size >= 3, 1, 0)
    part[rows[(pos >= n_train) & (pos < n_train + n_valid)]] = VALID
    part[rows[pos >= n_train + n_valid]] = TEST
    return part, cold


def per_user(users: np.ndarray, items: np.ndarray, num_users: int, order: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """CSR of each user's items (indptr (U+1,), items), in `order` (e.g. time) or as given."""
    idx = np.lexsort((order if order is not None else np.arange(len(users)), users))
    counts = np.bincount(users, minlength=num_users)
    return np.r_[0, np.cumsum(counts)].astype(np.int64), items[idx].astype(np.int64)


def padded(indptr: np.ndarray, flat: np.ndarray, rows: np.ndarray, length: int) -> np.ndarray:
    """(len(rows), length) int64: each row's last `length` items, right-aligned, -1 on the left."""
    out = np.full((len(rows), length), -1, np.int64)
    for r, u in enumerate(rows):
        seq = flat[indptr[u]:indptr[u + 1]][-length:]
        if len(seq):
            out[r, length - len(seq):] = seq
    return out


# ----------------------------------------------------------------------------------------------------------------
# the split as the run keeps it: split.safetensors (arrays) with a JSON header (ids, protocol), so evaluation
# needs nothing but the run folder

SPLIT_FILE = "split.safetensors"
SPLIT_KEY = "nnforge_split"


class SavedSplit:
    """A run's interactions by part: users, items, part and order (time rank, or file order) per interaction."""

    def __init__(self, arrays: dict[str, np.ndarray], header: dict):
        self.users, self.items = arrays["users"].astype(np.int64), arrays["items"].astype(np.int64)
        self.part, self.order = arrays["part"].astype(np.int8), arrays["order"].astype(np.int64)
        self.header = header
        self.num_users, self.num_items = int(header["num_users"]), int(header["num_items"])
        n = len(self.users)
        if not (len(self.items) == len(self.part) == len(self.order) == n):
            raise ValueError("split.safetensors: users, items, part and order differ in length")
        if n and (self.users.min() < 0 or self.users.max() >= self.num_users or self.items.min() < 0
                  or self.items.max() >= self.num_items):
            raise ValueError("split.safetensors: user or item indices out of range")

    def csr(self, *parts: int) -> tuple[np.ndarray, np.ndarray]:
        """Each user's items in these parts, oldest first."""
        keep = np.isin(self.part, parts)
        return per_user(self.users[keep], self.items[keep], self.num_users, self.order[keep])

    def counts(self, *parts: int) -> np.ndarray:
        """(num_items,) interactions per item in these parts (training popularity: TRAIN)."""
        keep = np.isin(self.part, parts)
        return np.bincount(self.items[keep], minlength=self.num_items).astype(np.float32)

    @property
    def cold_items(self) -> np.ndarray:
        return np.asarray(self.header.get("cold_items", []), np.int64)


def save_split(run_dir, arrays: dict[str, np.ndarray], header: dict) -> None:
    import json
    from pathlib import Path

    from safetensors.numpy import save

    from nnforge.engine.checkpoint import atomic_write_bytes

    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={SPLIT_KEY: json.dumps(header)})
    atomic_write_bytes(Path(run_dir) / SPLIT_FILE, data)


def load_split(run_dir) -> SavedSplit:
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a recommender run folder?")
    with safe_open(str(path), framework="numpy") as f:
        header = json.loads((f.metadata() or {}).get(SPLIT_KEY, "{}"))
    return SavedSplit(load_file(str(path)), header)
