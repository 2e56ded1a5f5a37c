"""The monitor's memory, one SQLite file: what it has counted, judged and said, so a restart continues exactly.

    state = State(Path("runs/monitor/news/state.db"), window_s=3600)
    new = [it for it in items if it.id not in state.known([it.id for it in items])]
    with state.batch():                      # one transaction: items, windows and judgements together or not at all
        state.add([(it.id, it.time, it.text, score, negative, ["all", "banks"]), ...])

    items      id, time, text, score, negative, topics     the last KEEP_WINDOWS windows' items
    windows    topic, start, count, negative, sum_score, sum_sq
    detector   topic, its first window, CUSUM  (meta judged_until: the first window not judged yet)
    alerts     topic, kind, window, payload (JSON), delivered  (one per topic, kind and window)
    files      files of a watched folder already read
    meta       window length, model, topics file, watermark (the latest item time), counters

One monitor writes a state at a time (an advisory lock on STATE.lock, which the kernel drops when a process dies,
however it dies); the dashboard only reads. Everything a batch changes commits at once, so a monitor killed at any
moment has counted each item exactly once or not at all, and replaying the same stream after a restart counts
nothing twice (ids are remembered). Alerts are committed with their window and sent afterwards, marked delivered
once sent: one committed but not sent before a crash is sent by the next start (at least once). Bounded: items and
windows older than KEEP_WINDOWS windows before the watermark are deleted (an item that old is refused as
late anyway), and at most KEEP_ALERTS alerts are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
from pathlib import Path

from nnforge.apps.monitor.detect import Window

KEEP_WINDOWS = 2000
KEEP_ALERTS = 5000
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, time REAL NOT NULL, text TEXT NOT NULL, score REAL NOT NULL,
                                  negative INTEGER NOT NULL, topics TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS items_time ON items(time);
CREATE TABLE IF NOT EXISTS windows (topic TEXT NOT NULL, start REAL NOT NULL, count INTEGER NOT NULL,
                                    negative INTEGER NOT NULL, sum_score REAL NOT NULL, sum_sq REAL NOT NULL,
                                    PRIMARY KEY (topic, start));
CREATE TABLE IF NOT EXISTS detector (topic TEXT PRIMARY KEY, first REAL NOT NULL, cusum REAL NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, kind TEXT NOT NULL,
                                   start REAL NOT NULL, payload TEXT NOT NULL, delivered INTEGER NOT NULL DEFAULT 0,
                                   UNIQUE (topic, kind, start));
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime REAL NOT NULL);
"""


class StateError(ValueError):
    """The state file belongs to a different configuration; the message says which setting differs."""


class State:
    def __init__(self, path: str | Path, window_s: float | None = None, config: dict | None = None,
                 readonly: bool = False):
        self.path = Path(path)
        self._lock = None
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no monitor state here")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = self.path.with_name(self.path.name + ".lock").open("w")
            try:  # one writer per state: two monitors would each judge the windows and alert twice
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise StateError(f"{self.path} is in use by another monitor; give this one its own --state") from None
            self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            self._open(window_s, config or {}, readonly)
        except BaseException:
            self.close()
            raise

    def _open(self, window_s: float | None, config: dict, readonly: bool) -> None:
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")  # the dashboard reads while the monitor writes
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        stored = self.meta("window_s")
        if window_s is not None and stored is not None and float(stored) != float(window_s):
            raise StateError(f"{self.path} was built with windows of {float(stored):g} s, not {window_s:g} s; use "
                             "the same --window or another --state")
        if not readonly:
            for key, value in config.items():
                old = self.meta(key)
                if old is not None and old != str(value):
                    raise StateError(f"{self.path} was built with {key} {old}, not {value}; use the same or "
                                     "another --state")
            with self.batch():
                if window_s is not None:
                    self.set_meta("window_s", str(float(window_s)))
                for key, value in config.items():
                    self.set_meta(key, str(value))
        self.window_s = float(self.meta("window_s") or window_s or 3600)

    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value))

    def count(self, key: str, n: int) -> None:
        if n:
            self.set_meta(key, str(int(self.meta(key) or 0) + n))

    @property
    def watermark(self) -> float | None:
        value = self.meta("watermark")
        return float(value) if value is not None else None

    @property
    def judged_until(self) -> float | None:
        """Start of the first window not judged yet: items before it are late."""
        value = self.meta("judged_until")
        return float(value) if value is not None else None

    def window_of(self, t: float) -> float:
        return (t // self.window_s) * self.window_s

    # ------------------------------------------------------------------------------------------------------------
    def known(self, ids: list[str]) -> set[str]:
        out = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            out.update(r[0] for r in self.db.execute(q, chunk))
        return out

    def add(self, rows: list[tuple[str, float, str, float, int, list[str]]]) -> None:
        """Store scored items (id, time, text, score, negative, topics) and add them to their windows."""
        self.db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                            [(i, t, x, s, n, json.dumps(tp)) for i, t, x, s, n, tp in rows])
        agg: dict[tuple[str, float], list] = {}
        for _, t, _, s, n, topics in rows:
            w = self.window_of(t)
            for topic in topics:
                a = agg.setdefault((topic, w), [0, 0, 0.0, 0.0])
                a[0] += 1
                a[1] += n
                a[2] += s
                a[3] += s * s
        self.db.executemany(
            "INSERT INTO windows VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(topic, start) DO UPDATE SET "
            "count = count + excluded.count, negative = negative + excluded.negative, "
            "sum_score = sum_score + excluded.sum_score, sum_sq = sum_sq + excluded.sum_sq",
            [(topic, w, *a) for (topic, w), a in agg.items()])
        for topic in {topic for topic, _ in agg}:
            first = min(w for tp, w in agg if tp == topic)
            self.db.execute("INSERT INTO detector VALUES (?, ?, 0.0) ON CONFLICT(topic) DO UPDATE SET "
                            "first = min(first, excluded.first)", (topic, first))

    def detectors(self) -> dict[str, tuple[float, float]]:
        return {t: (f, c) for t, f, c in self.db.execute("SELECT topic, first, cusum FROM detector")}

    def set_cusum(self, topic: str, value: float) -> None:
        self.db.execute("UPDATE detector SET cusum = ? WHERE topic = ?", (value, topic))

    def windows(self, topic: str, since: float, until: float) -> dict[float, Window]:
        """Windows of `topic` with since <= start < until, by start (empty windows are absent)."""
        rows = self.db.execute("SELECT start, count, negative, sum_score, sum_sq FROM windows WHERE topic = ? AND "
                               "start >= ? AND start < ? ORDER BY start", (topic, since, until))
        return {r[0]: Window(*r) for r in rows}

    def window_items(self, topic: str, start: float, limit: int = 10) -> list[dict]:
        """The most negative items of a window in a topic: the headlines behind an alert."""
        rows = self.db.execute("SELECT id, time, text, score, topics FROM items WHERE time >= ? AND time < ? "
                               "ORDER BY score, time", (start, start + self.window_s))
        out = []
        for i, t, x, s, tp in rows:
            if topic in json.loads(tp):
                out.append({"id": i, "time": t, "text": x, "score": round(s, 4)})
                if len(out) >= limit:
                    break
        return out

    def add_alert(self, topic: str, kind: str, start: float, payload: dict) -> bool:
        cur = self.db.execute("INSERT OR IGNORE INTO alerts (topic, kind, start, payload) VALUES (?, ?, ?, ?)",
                              (topic, kind, start, json.dumps(payload, ensure_ascii=False)))
        return cur.rowcount > 0

    def undelivered(self) -> list[tuple[int, dict]]:
        return [(i, json.loads(p)) for i, p in
                self.db.execute("SELECT id, payload FROM alerts WHERE delivered = 0 ORDER BY start, id")]

    def mark_delivered(self, ids: list[int]) -> None:
        self.db.executemany("UPDATE alerts SET delivered = 1 WHERE id = ?", [(i,) for i in ids])

    def alerts(self, limit: int = 200, since_id: int = 0) -> list[dict]:
        rows = self.db.execute("SELECT id, payload FROM alerts WHERE id > ? ORDER BY id DESC LIMIT ?",
                               (since_id, limit))
        return [{"alert_id": i, **json.loads(p)} for i, p in rows]

    def prune(self) -> None:
        mark = self.watermark
        if mark is None:
            return
        horizon = self.window_of(mark) - KEEP_WINDOWS * self.window_s
        self.db.execute("DELETE FROM items WHERE time < ?", (horizon,))
        self.db.execute("DELETE FROM windows WHERE start < ?", (horizon,))
        self.db.execute("DELETE FROM alerts WHERE id <= (SELECT max(id) FROM alerts) - ?", (KEEP_ALERTS,))

    def file_done(self, path: Path) -> bool:
        st = path.stat()
        row = self.db.execute("SELECT size, mtime FROM files WHERE path = ?", (str(path.resolve()),)).fetchone()
        return row is not None and row == (st.st_size, st.st_mtime)

    def mark_file(self, path: Path) -> None:
        st = path.stat()
        self.db.execute("INSERT INTO files VALUES (?, ?, ?) ON CONFLICT(path) DO UPDATE SET size = excluded.size, "
                        "mtime = excluded.mtime", (str(path.resolve()), st.st_size, st.st_mtime))

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock (the kernel also does when a process dies)
