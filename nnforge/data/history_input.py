"""The history input kind: a recommendation request -> one int64 row for a recommender's towers.

    pre = build_input({"kind": "history", "max_len": 50, "max_k": 1000, "num_items": 1682}, "runs/recsys/exp1")
    row = pre.load({"user": "42", "k": 10})          # or {"history": ["50", "172"]}, or {"item": "50"}
    pre.read_json({"user": "42", "k": 10, "exclude_seen": True}, max_inputs=64)    # a POST /v1/recommend body

A row is [k, flags, user, h_1 ... h_L] (the layout nnforge/models/recsys.py reads): how many items are wanted;
flags (1: leave the history out of the answer, 2: the user is unknown, 4: "more like this" an item); the user's
index or -1; the history's item indices, oldest first, right-aligned after -1 padding. A known user's history is
the run's record of them (users.safetensors); a history in the request is mapped through the catalogue
(items.safetensors), items added since training included; a longer history keeps its last L items. An unknown
user is not an error: the row says so and the answer is the popular items, flagged. k outside 1..max_k, an unknown
item, or a body that is not one of the three requests is an InputError (HTTP 400).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnforge.data.catalogue import Catalogue, UserHistories
from nnforge.data.inputs import InputError, InputKind, bounded, whole

K, FLAGS, USER, HISTORY = 0, 1, 2, 3  # columns (models/recsys.py reads USER and HISTORY: ROW_USER, ROW_HISTORY)
EXCLUDE_SEEN, UNKNOWN_USER, SIMILAR = 1, 2, 4  # flag bits
DEFAULT_K = 10
MAX_REQUEST_HISTORY = 10_000  # items a request's history may list (the row keeps the last max_len)
REQUEST_KEYS = ("user", "history", "item", "k", "exclude_seen")


def _id(value, where: str) -> str:
    """A user or item id as JSON gives it: a string, or a whole number (read as its decimal text)."""
    value = whole(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InputError(f"{where}: expected an id (a string or a whole number), got {type(value).__name__}")
    return str(value)


class HistoryInput(InputKind):
    name = "history"
    dtype = "int64"
    json_key = "history"

    def __init__(self, spec: dict, run_dir: str | Path | None = None):
        if run_dir is None:
            raise ValueError("a recommender's requests are read against its run folder (items and users files)")
        self.max_len = bounded(spec, "max_len", 1, 4096)
        self.max_k = bounded(spec, "max_k", 1, 1_000_000)
        self.num_items = bounded(spec, "num_items", 1, 50_000_000)  # the model's own items
        self.run_dir = Path(run_dir)

    # the run's files are read on first use (and again when they change: items added since), so that loading a run
    # whose index is not built yet (its first evaluation builds it) still works
    @property
    def catalogue(self) -> Catalogue:
        return Catalogue.open(self.run_dir)

    @property
    def users(self) -> UserHistories:
        return UserHistories.open(self.run_dir)

    # ---- requests -> rows ----
    def _row(self, k: int, flags: int, user: int, history: np.ndarray) -> np.ndarray:
        row = np.full(HISTORY + self.max_len, -1, np.int64)
        row[K], row[FLAGS], row[USER] = k, flags, user
        h = history[-self.max_len:]
        if len(h):
            row[len(row) - len(h):] = h
        return row

    def request(self, data) -> np.ndarray:
        """A request {"user" | "history" | "item", "k", "exclude_seen"} -> its row; InputError saying what is wrong."""
        if not isinstance(data, dict):
            raise InputError('expected a JSON object such as {"user": "42", "k": 10} or {"history": ["50"]}')
        unknown = sorted(set(data) - set(REQUEST_KEYS))
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(unknown)}; a request takes {', '.join(REQUEST_KEYS)}")
        asked = [key for key in ("user", "history", "item") if key in data]
        if len(asked) != 1:
            raise InputError('send exactly one of "user", "history" (item ids) or "item" ("more like this")'
                             + (f"; got {' and '.join(asked)}" if asked else ""))
        k = whole(data.get("k", min(DEFAULT_K, self.max_k)))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_k:
            raise InputError(f'"k" must be a whole number from 1 to {self.max_k}, got {k!r}')
        exclude = data.get("exclude_seen", False)
        if not isinstance(exclude, bool):
            raise InputError(f'"exclude_seen" must be true or false, got {exclude!r}')
        flags = EXCLUDE_SEEN if exclude else 0
        if "user" in data:
            user = self.users.index_of.get(_id(data["user"], "user"))
            if user is None:
                return self._row(k, flags | UNKNOWN_USER, -1, np.zeros(0, np.int64))
            return self._row(k, flags, user, self.users.history(user))
        if "item" in data:
            return self._row(k, SIMILAR | EXCLUDE_SEEN, -1, np.asarray([self._item(data["item"], "item")]))
        values = data["history"]
        if not isinstance(values, list):
            raise InputError(f'"history" must be a list of item ids, got {type(values).__name__}')
        if len(values) > MAX_REQUEST_HISTORY:
            raise InputError(f'"history" lists {len(values)} items; the limit is {MAX_REQUEST_HISTORY}')
        items = np.asarray([self._item(v, f"history[{i}]") for i, v in enumerate(values)], np.int64)
        return self._row(k, flags | (0 if len(items) else UNKNOWN_USER), -1, items)

    def _item(self, value, where: str) -> int:
        item = _id(value, where)
        index = self.catalogue.index_of.get(item)
        if index is None:
            raise InputError(f"{where}: unknown item {item!r} (the catalogue has {len(self.catalogue)} items)")
        return index

    def read_json(self, data, max_inputs: int) -> list[tuple[str, np.ndarray]]:
        return [(self.describe(data), self.request(data))]

    def load(self, item) -> np.ndarray:
        """A request dict, or a user id (the command line's `nnforge predict RUN 42`)."""
        return self.request(item if isinstance(item, dict) else {"user": item})

    def decode(self, raw) -> np.ndarray:
        if isinstance(raw, dict | str | int):
            return self.load(raw)
        row = np.asarray(raw)
        if row.shape != (HISTORY + self.max_len,) or row.dtype != np.int64:
            raise InputError(f"expected a request row of {HISTORY + self.max_len} int64 values")
        n = len(self.catalogue)
        h = row[HISTORY:]
        if not 1 <= row[K] <= self.max_k or not -1 <= row[USER] < len(self.users.ids) or ((h < -1) | (h >= n)).any():
            raise InputError("a request row with k, user or items out of range")
        return row

    def describe(self, item) -> str:
        if isinstance(item, dict):
            for key in ("user", "item"):
                if key in item:
                    return f"{key}={item[key]}"
            if isinstance(item.get("history"), list):
                return f"history({len(item['history'])} items)"
            return "<request>"
        return f"user={item}" if isinstance(item, str | int) else "<request>"

    # ---- rows for tracing and parity ----
    def example(self, n: int = 2) -> np.ndarray:
        h = np.arange(min(3, self.num_items), dtype=np.int64)
        return np.stack([self._row(min(DEFAULT_K, self.max_k), 0, -1, h) for _ in range(n)])

    def synthetic(self, n: int = 16) -> list[np.ndarray]:
        rng = np.random.default_rng(0)
        rows = []
        for i in range(n):
            length = int(rng.integers(0, self.max_len + 1))
            h = rng.integers(0, self.num_items, length)
            user = int(rng.integers(0, len(self.users.ids))) if i % 2 and self.users.ids else -1
            rows.append(self._row(min(DEFAULT_K, self.max_k), 0, user, h))
        return rows

    def parity_inputs(self, run_dir: str | Path) -> tuple[str, list[np.ndarray]]:
        """The first known users' own requests: real histories."""
        users = range(min(64, len(self.users.ids)))
        if not users:
            return "synthetic", self.synthetic()
        return "recorded", [self.request({"user": self.users.ids[u]}) for u in users]

    @classmethod
    def openapi_content(cls, spec: dict, max_inputs: int) -> dict:
        ident = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
        schema = {"type": "object", "additionalProperties": False, "properties": {
            "user": {**ident, "description": "a known user's id; an unknown one gets popular items, flagged"},
            "history": {"type": "array", "items": ident, "maxItems": MAX_REQUEST_HISTORY,
                        "description": "item ids the user interacted with, oldest first (instead of a user)"},
            "item": {**ident, "description": "an item id: items like it (instead of a user)"},
            "k": {"type": "integer", "minimum": 1, "maximum": int(spec.get("max_k", DEFAULT_K)),
                  "description": f"how many items (default {DEFAULT_K})"},
            "exclude_seen": {"type": "boolean", "description": "leave the user's own items out (default false)"}},
            "oneOf": [{"required": ["user"]}, {"required": ["history"]}, {"required": ["item"]}]}
        return {"application/json": {"schema": schema}}
