"""What a recommender run serves beside its model: the item catalogue with its index, and the known users' histories.
Numpy and safetensors only (no pickle, no PyTorch), so the ONNX Runtime server reads them too.

    cat = Catalogue.open("runs/recsys/exp1")              # items.safetensors
    top, scores = cat.search(user_vectors, k=10, exclude=[np.array([3, 7])])
    users = UserHistories.open("runs/recsys/exp1")        # users.safetensors: each user's items, oldest first

items.safetensors holds one row per item, in the model's item order and then the items added since training: the
vector the served model scores against and the training popularity (the answer for a user nobody knows). Its JSON
header holds the ids, the titles, how many of the items the model itself was trained with, and the texts of the
items added since, so that an index rebuilt after retraining embeds them again through the new item tower.

Search is exact by default: one matrix product and a partial sort. With the faiss package installed and at least
FAISS_MIN_ITEMS items, an HNSW graph over inner products answers instead (approximate, a fraction of a millisecond
per query where exact search over millions of items takes tens).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

ITEMS_FILE, USERS_FILE = "items.safetensors", "users.safetensors"
HEADER_KEY = "nnforge_catalogue"
FAISS_MIN_ITEMS = 200_000  # below this, exact search is fast enough and exact
HNSW_NEIGHBOURS = 32
MAX_ITEMS = 50_000_000  # a run folder is data: sizes read from it are checked


class CatalogueError(ValueError):
    """A run's items.safetensors or users.safetensors is missing or damaged."""


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    if not path.is_file():
        raise CatalogueError(f"{path}: missing; a recommender run writes it when it is evaluated (nnforge evaluate "
                             f"{path.parent})")
    try:
        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            header = json.loads((f.metadata() or {}).get(HEADER_KEY, "null"))
    except Exception as err:  # noqa: BLE001 - safetensors and json raise several types for a damaged file
        raise CatalogueError(f"{path}: not a readable catalogue file ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise CatalogueError(f"{path}: no nnforge catalogue header")
    return arrays, header


def _write(path: Path, arrays: dict[str, np.ndarray], header: dict) -> None:
    from nnforge.engine.checkpoint import atomic_write_bytes  # writing happens where PyTorch is loaded anyway

    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={HEADER_KEY: json.dumps(header)})
    atomic_write_bytes(path, data)


_OPEN: dict[tuple[str, str], tuple[tuple[int, int], object]] = {}  # (kind, path) -> (file stamp, loaded object)


def _cached(kind: str, path: Path, load):
    """One load per file version, shared by the input and output kinds of a served run."""
    st = path.stat() if path.is_file() else None
    stamp = (st.st_mtime_ns, st.st_size) if st else (0, 0)
    key = (kind, str(path.resolve()))
    hit = _OPEN.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = load(path)
    _OPEN[key] = (stamp, value)
    return value


@dataclass
class Catalogue:
    ids: list[str]
    titles: list[str]
    vectors: np.ndarray            # (N, D) float32
    popularity: np.ndarray         # (N,) float32, training interactions
    trained: int                   # the model's own items come first: [0, trained)
    header: dict = field(default_factory=dict)  # e.g. added_texts: the texts of items [trained, N)
    index_of: dict[str, int] = field(init=False)
    _faiss: object = field(default=None, init=False, repr=False)
    _unit: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.index_of = {i: n for n, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, run_dir: str | Path) -> Catalogue:
        return _cached("items", Path(run_dir) / ITEMS_FILE, cls._load)

    @classmethod
    def _load(cls, path: Path) -> Catalogue:
        arrays, h = _read(path)
        vectors, pop = arrays.get("vectors"), arrays.get("popularity")
        ids, titles = h.get("ids"), h.get("titles")
        if vectors is None or pop is None or vectors.ndim != 2 or not isinstance(ids, list):
            raise CatalogueError(f"{path}: expected vectors (N, D), popularity (N,) and a list of ids")
        n = len(ids)
        if not 1 <= n <= MAX_ITEMS or vectors.shape[0] != n or pop.shape != (n,) or len(titles or []) != n:
            raise CatalogueError(f"{path}: {n} ids but {vectors.shape[0]} vectors, {pop.shape} popularity, "
                                 f"{len(titles or [])} titles")
        if len(set(ids)) != n:
            raise CatalogueError(f"{path}: item ids repeat")
        trained = h.get("trained")
        if isinstance(trained, bool) or not isinstance(trained, int) or not 0 < trained <= n:
            raise CatalogueError(f"{path}: trained={trained!r}; expected a count from 1 to {n}")
        return cls([str(i) for i in ids], [str(t) for t in titles], vectors.astype(np.float32),
                   pop.astype(np.float32), trained, h)

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / ITEMS_FILE
        arrays = {"vectors": self.vectors.astype(np.float32), "popularity": self.popularity.astype(np.float32)}
        _write(path, arrays, {**self.header, "ids": self.ids, "titles": self.titles, "trained": self.trained})
        return path

    # ---- search ----
    @property
    def uses_faiss(self) -> bool:
        if len(self) < FAISS_MIN_ITEMS or os.environ.get("NNFORGE_NO_FAISS"):
            return False
        try:
            import faiss  # noqa: F401
        except ImportError:
            return False
        return True

    def _faiss_index(self):
        if self._faiss is None:
            import faiss

            index = faiss.IndexHNSWFlat(self.vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            index.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            self._faiss = index
        return self._faiss

    def unit_vectors(self) -> np.ndarray:
        if self._unit is None:
            norm = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = self.vectors / np.maximum(norm, 1e-12)
        return self._unit

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray], cosine: bool = False,
               scores: np.ndarray | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query: (item indices, scores) of the k best items not in its `exclude`, best first. `scores` (B, N)
        ranks by given scores instead (the popularity fallback); cosine ranks by angle ("more like this")."""
        queries = np.asarray(queries, dtype=np.float32)
        if scores is None and not cosine and self.uses_faiss:
            return self._search_faiss(queries, k, exclude)
        if scores is None:
            table = self.unit_vectors() if cosine else self.vectors
            q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12) if cosine else queries
            scores = q @ table.T  # (B, N)
        else:
            scores = np.array(scores, dtype=np.float32, copy=True)
        tops, values = [], []
        for row, ex in zip(scores, exclude, strict=True):
            if len(ex):
                row[ex] = -np.inf
            kk = min(k, len(row))
            top = np.argpartition(-row, kk - 1)[:kk] if kk < len(row) else np.arange(len(row))
            top = top[np.lexsort((top, -row[top]))]  # best first; equal scores by index, so answers repeat
            top = top[np.isfinite(row[top])]
            tops.append(top)
            values.append(row[top])
        return tops, values

    def _search_faiss(self, queries, k, exclude):
        index = self._faiss_index()
        tops, values = [], []
        for q, ex in zip(queries, exclude, strict=True):
            want = min(len(self), k + len(ex))
            index.hnsw.efSearch = max(64, 2 * want)
            d, i = index.search(q[None], want)
            drop = set(ex.tolist())
            keep = [(s, j) for s, j in zip(d[0], i[0], strict=True) if j >= 0 and j not in drop][:k]
            tops.append(np.asarray([j for _, j in keep], np.int64))
            values.append(np.asarray([s for s, _ in keep], np.float32))
        return tops, values


@dataclass
class UserHistories:
    """Each known user's items, oldest first (CSR); what a {"user": ...} request reads."""

    ids: list[str]
    indptr: np.ndarray  # (U + 1,) int64
    items: np.ndarray   # (nnz,) int64
    index_of: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index_of = {u: n for n, u in enumerate(self.ids)}

    def history(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user]:self.indptr[user + 1]]

    @classmethod
    def open(cls, run_dir: str | Path) -> UserHistories:
        return _cached("users", Path(run_dir) / USERS_FILE, cls._load)

    @classmethod
    def _load(cls, path: Path) -> UserHistories:
        arrays, h = _read(path)
        ids, indptr, items = h.get("ids"), arrays.get("indptr"), arrays.get("items")
        if not isinstance(ids, list) or indptr is None or items is None or indptr.shape != (len(ids) + 1,):
            raise CatalogueError(f"{path}: expected a list of user ids and indptr with one more entry")
        if indptr[0] != 0 or indptr[-1] != len(items) or (np.diff(indptr) < 0).any():
            raise CatalogueError(f"{path}: indptr does not describe {len(items)} items")
        return cls([str(u) for u in ids], indptr.astype(np.int64), items.astype(np.int64))

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / USERS_FILE
        _write(path, {"indptr": self.indptr, "items": self.items}, {"ids": self.ids})
        return path
