"""Feedback capture: inputs the served model was unsure of (plus a small random sample of all traffic), kept for
labelling, bounded on disk.

    nnforge serve shoes@champion --capture captures/ [--capture-threshold 0.6] [--capture-margin 0.2]
                                  [--capture-sample 0.02] [--capture-max-mb 500]
    store = CaptureStore("captures/")           # what the labelling page and `nnforge retrain` read
    store.items(status="new"); store.set_label(7, "sneaker"); store.labelled()

Layout: DIR/capture.db (SQLite: one row per captured input with the prediction, top guesses, probabilities, model
version and time, and later its label) and DIR/items/ (the input exactly as it arrived: image bytes with their own
extension, texts as UTF-8 .txt). Nothing is decoded or changed on the way in, so a label is for the input the model
saw.

Why both kinds: the low-confidence items are the informative ones to label, but they are a biased sample of the
traffic; the random sample ("sample" reason) gives an unbiased estimate of accuracy on current traffic.

Bounded: when the files pass --capture-max-mb the oldest unlabelled items are dropped first; labelled items are
never dropped (labels cost a person's time), so a store full of labelled items captures nothing more until they are
exported or deleted (logged once). On the server the capture is off the request path: the request thread only
picks the indices and puts copies on a bounded queue; one writer thread per process writes them, and a full queue
drops the capture (counted), never the request. Opt-in, because inputs may be private.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import queue
import random
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger("nnforge.capture")

STATUSES = ("new", "labelled", "skipped", "unclear")
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file TEXT NOT NULL,             -- under DIR/items/
    kind TEXT NOT NULL,             -- image | text
    name TEXT,                      -- the client's file name or field, as sent
    at REAL NOT NULL,               -- unix time of the request
    model TEXT, version TEXT, run TEXT,
    prediction TEXT, confidence REAL, margin REAL,
    top TEXT,                       -- JSON [[label, probability], ...], best first (at most 5)
    probs TEXT,                     -- JSON, aligned with the classes in meta
    reason TEXT NOT NULL,           -- low_confidence | sample
    bytes INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'new',
    label TEXT, labelled_at REAL, labelled_by TEXT
);
CREATE INDEX IF NOT EXISTS items_status ON items(status, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
               (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


class CaptureError(ValueError):
    """A capture folder, item or label that is not what was expected."""


def image_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in IMAGE_TYPES if data.startswith(magic)), ".bin")


class CaptureStore:
    def __init__(self, folder: str | Path, max_bytes: int | None = None, create: bool = False):
        self.folder = Path(folder)
        self.db = self.folder / "capture.db"
        if not self.db.is_file() and not create:
            raise CaptureError(f"{self.folder}: no capture.db here; serve with --capture {self.folder} first")
        (self.folder / "items").mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._full_logged = False
        with self._conn() as c:
            c.executescript(SCHEMA)

    @contextmanager
    def _conn(self):
        # one short connection per operation: several server processes and the labelling page share the file
        with closing(sqlite3.connect(self.db, timeout=30, isolation_level=None)) as conn:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn

    # --- writing (the server) ----------------------------------------------------------------------------------
    def add(self, content: bytes | str, record: dict) -> int | None:
        """Store one input and its record; returns its id, or None when the store is full of labelled items."""
        kind = "text" if isinstance(content, str) else "image"
        data = content.encode("utf-8") if kind == "text" else bytes(content)
        suffix = ".txt" if kind == "text" else image_suffix(data)
        name = f"{time.time_ns()}-{os.getpid()}-{random.getrandbits(32):08x}{suffix}"
        path = self.folder / "items" / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # the row is written after the file: a row never points at half a file
        cols = {"file": name, "kind": kind, "bytes": len(data), "at": record.get("at", time.time()),
                **{k: record.get(k) for k in ("name", "model", "version", "run", "prediction", "confidence",
                                              "margin", "reason")}}
        cols["top"] = json.dumps(record.get("top") or [])
        cols["probs"] = json.dumps(record.get("probs") or [])
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            cur = c.execute(f"INSERT INTO items ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                            list(cols.values()))
            new_id, dropped = cur.lastrowid, self._evict(c)
            c.execute("COMMIT")
        for f in dropped:
            (self.folder / "items" / f).unlink(missing_ok=True)
        if name in dropped:
            return None
        return new_id

    def _evict(self, c) -> list[str]:
        """Drop the oldest unlabelled items until the files fit in max_bytes; returns the files to delete."""
        if not self.max_bytes:
            return []
        total = c.execute("SELECT COALESCE(SUM(bytes), 0) FROM items").fetchone()[0]
        dropped = []
        for row in c.execute("SELECT id, file, bytes FROM items WHERE status = 'new' ORDER BY id").fetchall():
            if total <= self.max_bytes:
                break
            c.execute("DELETE FROM items WHERE id = ?", (row["id"],))
            dropped.append(row["file"])
            total -= row["bytes"]
        if total > self.max_bytes and not self._full_logged:
            self._full_logged = True
            log.warning("capture: %s is full of labelled items (%.1f MB > %.1f MB); nothing more is captured until "
                        "they are exported and removed", self.folder, total / 1e6, self.max_bytes / 1e6)
        return dropped

    def set_meta(self, key: str, value) -> None:
        with self._conn() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                      (key, json.dumps(value), json.dumps(value)))

    # --- reading and labelling (the labelling page, retrain) ----------------------------------------------------
    def meta(self, key: str, default=None):
        with self._conn() as c:
            row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    @property
    def classes(self) -> list[str]:
        return self.meta("classes", [])

    def _row(self, row: sqlite3.Row) -> dict:
        out = dict(row)
        out["top"] = json.loads(out["top"] or "[]")
        out["probs"] = json.loads(out["probs"] or "[]")
        out["path"] = str((self.folder / "items" / out["file"]).resolve())
        return out

    def items(self, status: str | None = None, limit: int | None = None, after: int = 0) -> list[dict]:
        if status is not None and status not in STATUSES:
            raise CaptureError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        sql = "SELECT * FROM items WHERE id > ?" + (" AND status = ?" if status else "") + " ORDER BY id"
        args: list = [after] + ([status] if status else [])
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        with self._conn() as c:
            return [self._row(r) for r in c.execute(sql, args).fetchall()]

    def get(self, item_id: int) -> dict:
        with self._conn() as c:
            row = c.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise CaptureError(f"{self.folder}: no captured item {item_id}")
        return self._row(row)

    def content(self, item: dict) -> bytes:
        return (self.folder / "items" / item["file"]).read_bytes()

    def counts(self) -> dict:
        with self._conn() as c:
            rows = c.execute("SELECT status, reason, COUNT(*) AS n FROM items GROUP BY status, reason").fetchall()
            size = c.execute("SELECT COALESCE(SUM(bytes), 0) FROM items").fetchone()[0]
        out = {s: 0 for s in STATUSES} | {"low_confidence": 0, "sample": 0, "bytes": size}
        for r in rows:
            out[r["status"]] += r["n"]
            out[r["reason"]] = out.get(r["reason"], 0) + r["n"]
        out["total"] = sum(out[s] for s in STATUSES)
        return out

    def set_label(self, item_id: int, label: str | None = None, status: str = "labelled", by: str = "") -> dict:
        """Label an item (status labelled), or mark it skipped / unclear / new again (label cleared)."""
        if status not in STATUSES:
            raise CaptureError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        if status == "labelled":
            classes = self.classes
            if not label or (classes and label not in classes):
                raise CaptureError(f"label {label!r}: expected one of the model's classes {classes}")
        else:
            label = None
        self.get(item_id)
        with self._conn() as c:
            c.execute("UPDATE items SET status = ?, label = ?, labelled_at = ?, labelled_by = ? WHERE id = ?",
                      (status, label, time.time() if status != "new" else None, by or None, item_id))
        return self.get(item_id)

    def labelled(self) -> list[tuple[str, str, int]]:
        """(input, label, id) of every labelled item: the file path for images, the text itself for texts."""
        out = []
        for it in self.items(status="labelled"):
            value = Path(it["path"]).read_text(encoding="utf-8") if it["kind"] == "text" else it["path"]
            out.append((value, it["label"], it["id"]))
        return out

    # --- CSV, the layout `nnforge train` reads ------------------------------------------------------------------
    def export_csv(self, path: str | Path, split: str = "train") -> int:
        """Labelled items as path,label,split (images; paths relative to the CSV) or text,label,split (texts)."""
        path = Path(path)
        rows = self.items(status="labelled")
        kinds = {r["kind"] for r in rows} or {"image"}
        if len(kinds) > 1:
            raise CaptureError(f"{self.folder}: holds both images and texts; export them from separate stores")
        text = kinds == {"text"}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text" if text else "path", "label", "split"])
            for r in rows:
                value = Path(r["path"]).read_text(encoding="utf-8") if text else os.path.relpath(r["path"], path.parent)
                w.writerow([value, r["label"], split])
        os.replace(tmp, path)
        return len(rows)

    def import_csv(self, path: str | Path, by: str = "import") -> int:
        """Labels from a CSV with path (or text) and label columns, matched to the captured items; every row is
        checked before any label is written, and a row that matches nothing is an error naming its line."""
        path = Path(path)
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return 0
        key = "path" if "path" in rows[0] else "text" if "text" in rows[0] else None
        if key is None or "label" not in rows[0]:
            raise CaptureError(f"{path}: expected columns path,label[,split] (or text,label); found {list(rows[0])}")
        items = self.items()
        if key == "path":
            index = {str(Path(it["path"]).resolve()): it["id"] for it in items}
            by_file = {it["file"]: it["id"] for it in items}  # file names are unique: a CSV from a copied folder

            def find(v: str) -> int | None:
                return index.get(str((path.parent / v).resolve())) or by_file.get(Path(v).name)
        else:
            index = {Path(it["path"]).read_text(encoding="utf-8"): it["id"] for it in items if it["kind"] == "text"}
            find = index.get  # type: ignore[assignment]
        classes = self.classes
        plan = []
        for line, row in enumerate(rows, start=2):
            item_id = find(row[key] or "")
            if item_id is None:
                raise CaptureError(f"{path}:{line}: {key} {row[key]!r} is not a captured item in {self.folder}")
            label = (row["label"] or "").strip()
            if classes and label not in classes:
                raise CaptureError(f"{path}:{line}: label {label!r}: expected one of {classes}")
            plan.append((item_id, label))
        for item_id, label in plan:
            self.set_label(item_id, label, by=by)
        return len(plan)


def confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top index, top probability, margin to the second) per row of a (N, C) probability array."""
    order = np.argsort(-probs, axis=1)
    top = probs[np.arange(len(probs)), order[:, 0]]
    second = probs[np.arange(len(probs)), order[:, 1]] if probs.shape[1] > 1 else np.zeros(len(probs))
    return order[:, 0], top, top - second


class Capturer:
    """The server's side: choose what to keep (cheap, on the request path), write it on a thread (off it)."""

    def __init__(self, folder: str | Path, threshold: float = 0.6, margin: float = 0.2, sample: float = 0.02,
                 max_mb: float = 500, queue_size: int = 256, seed: int | None = None):
        self.store = CaptureStore(folder, max_bytes=int(max_mb * 1e6), create=True)
        self.threshold, self.margin, self.sample = threshold, margin, sample
        self.rng = random.Random(seed)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = self.kept = 0
        self._classes_of: str | None = None
        self._thread = threading.Thread(target=self._write_loop, name="nnforge-capture", daemon=True)
        self._thread.start()

    def choose(self, probs: np.ndarray) -> list[tuple[int, str]]:
        """(row, reason) of the rows to keep: below the top-probability or margin threshold, or sampled."""
        _, top, margin = confidence(probs)
        out = []
        for i in range(len(probs)):
            if top[i] < self.threshold or margin[i] < self.margin:
                out.append((i, "low_confidence"))
            elif self.rng.random() < self.sample:
                out.append((i, "sample"))
        return out

    def offer(self, items: list[tuple[str, bytes | str]], probs: np.ndarray, classes: list[str],
              model: dict) -> int:
        """Queue the chosen inputs of one answered request; never blocks (a full queue drops them, counted)."""
        chosen = self.choose(probs)
        if not chosen:
            return 0
        idx, top, margin = confidence(probs)
        now = time.time()
        for i, reason in chosen:
            name, raw = items[i]
            if not isinstance(raw, bytes | str):
                continue
            order = np.argsort(-probs[i])[:5]
            record = {"name": name, "at": now, "reason": reason, "prediction": classes[idx[i]],
                      "confidence": float(top[i]), "margin": float(margin[i]),
                      "top": [[classes[j], round(float(probs[i, j]), 6)] for j in order],
                      "probs": [round(float(p), 6) for p in probs[i]], "classes": classes, **model}
            try:
                self.queue.put_nowait((raw, record))
            except queue.Full:
                self.dropped += 1
        return len(chosen)

    def _write_loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            raw, record = job
            try:
                classes = record.pop("classes")
                key = json.dumps(classes)
                if key != self._classes_of:  # the labelling page offers the served model's classes
                    self.store.set_meta("classes", classes)
                    self._classes_of = key
                if self.store.add(raw, record) is not None:
                    self.kept += 1
            except Exception as err:  # a full disk must not take the server down with it
                self.dropped += 1
                log.error("capture: could not write an item to %s: %s", self.store.folder, err)
            finally:
                self.queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued is written (tests, shutdown)."""
        end = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)

    def close(self) -> None:
        self.flush()
        self.queue.put(None)
        self._thread.join(timeout=5)
