"""Where the monitor's items come from: a file replayed in time order, a folder watched for new files, stdin.
(The fourth source, POSTs to the monitor's own endpoint, is server.py.)

    for batch in replay_file(Path("news.csv"), Columns()): ...      # lists of Item, oldest first
    for batch in watch_folder(Path("news/"), Columns(), seen, stop): ...
    for batch in read_stdin(sys.stdin, Columns(), stop): ...

An item is (id, time, text). Times are ISO 8601 (a date, or a date and time; without a zone: UTC) or Unix seconds
(milliseconds when larger than 1e11). Without an id column the id is a hash of the time and the text, so the same
headline at the same time is one item however often it is read. A row without a usable text or time is skipped and
reported with its file and line (the first few of them; then a count).
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nnforge.data.tables import read_table

BATCH = 256  # items scored and stored together (one model call, one SQLite transaction)
SHOWN_PROBLEMS = 5
FILE_TYPES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
TEXT_NAMES = ("text", "headline", "title", "Text", "Headline", "Title")
TIME_NAMES = ("time", "date", "timestamp", "published", "Date", "Time", "Timestamp")


@dataclass
class Item:
    id: str
    time: float  # Unix seconds, UTC
    text: str


@dataclass
class Columns:
    text: str | None = None  # None: the first of TEXT_NAMES the file has
    time: str | None = None  # None: the first of TIME_NAMES; a stream without times needs --clock wall
    id: str | None = None  # None: a hash of time and text
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of skipped rows
    skipped: int = 0

    def problem(self, where: str, reason: str) -> None:
        self.skipped += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(f"{where}: {reason}")
            print(f"monitor: skipped {where}: {reason}", file=sys.stderr, flush=True)


def parse_time(value) -> float:
    """Unix seconds of an ISO 8601 date/time or a number; ValueError saying what was expected."""
    if isinstance(value, bool):
        raise ValueError(f"time {value!r}: expected an ISO 8601 date/time or Unix seconds")
    if isinstance(value, int | float):
        t = float(value)
    else:
        text = str(value).strip()
        try:
            t = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text.replace(" ", "T", 1) if len(text) > 10 else text)
            except ValueError:
                raise ValueError(f"time '{text[:40]}': expected an ISO 8601 date/time (2020-03-09 or "
                                 "2020-03-09T14:30:00Z) or Unix seconds") from None
            return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if t != t or abs(t) > 1e15:
        raise ValueError(f"time {value!r}: not a usable number of seconds")
    return t / 1000.0 if t > 1e11 else t


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def item_id(t: float, text: str) -> str:
    return hashlib.sha1(f"{t:.3f}\n{text}".encode()).hexdigest()[:20]


def make_item(raw_text, raw_time, raw_id, cols: Columns, where: str, now: Callable[[], float] | None) -> Item | None:
    if not isinstance(raw_text, str) or not raw_text.strip():
        cols.problem(where, "empty or missing text")
        return None
    text = " ".join(raw_text.split())  # line breaks inside a headline are layout, not content
    if raw_time is None or (isinstance(raw_time, str) and not raw_time.strip()):
        if now is None:
            cols.problem(where, "no time; give a time column or run with --clock wall")
            return None
        t = now()
    else:
        try:
            t = parse_time(raw_time)
        except ValueError as err:
            cols.problem(where, str(err))
            return None
    ident = str(raw_id).strip() if raw_id not in (None, "") else item_id(t, text)
    return Item(ident, t, text)


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], path: Path, flag: str,
          required: bool) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{path}: no column '{wanted}' ({flag}); it has {names}")
        return wanted
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise ValueError(f"{path}: no text column (tried {', '.join(candidates)}); name it with {flag}")
    return found


def read_items(path: Path, cols: Columns, now: Callable[[], float] | None = None) -> list[Item]:
    """Every usable item of a CSV/TSV/JSONL file, in file order."""
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise ValueError(f"{path}: unsupported file type '{suffix}'; expected {', '.join(FILE_TYPES)}")
    items = []
    if suffix in (".csv", ".tsv"):
        head = read_table(path, "\t" if suffix == ".tsv" else ",", {})
        text_col = _pick(head.header, cols.text, TEXT_NAMES, path, "--text-col", True)
        time_col = _pick(head.header, cols.time, TIME_NAMES, path, "--time-col", False)
        id_col = _pick(head.header, cols.id, (), path, "--id-col", False) if cols.id else None
        idx = {c: head.header.index(c) for c in (text_col, time_col, id_col) if c is not None}
        for skip in head.skipped:
            cols.problem(skip["path"], skip["reason"])
        for line, f in head.rows:
            item = make_item(f[idx[text_col]], f[idx[time_col]] if time_col else None,
                             f[idx[id_col]] if id_col else None, cols, f"{path}:{line}", now)
            if item is not None:
                items.append(item)
        return items
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (byte {err.start})") from None
    for n, line in enumerate(content.splitlines(), 1):
        if line.strip():
            item = item_from_json(line, cols, f"{path}:{n}", now)
            if item is not None:
                items.append(item)
    return items


def item_from_json(line: str | dict, cols: Columns, where: str, now: Callable[[], float] | None) -> Item | None:
    if isinstance(line, str):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            cols.problem(where, f"not JSON ({err})")
            return None
    else:
        row = line
    if not isinstance(row, dict):
        cols.problem(where, 'expected a JSON object {"text": ..., "time": ...}')
        return None
    text_key = cols.text or next((k for k in TEXT_NAMES if k in row), "text")
    time_key = cols.time or next((k for k in TIME_NAMES if k in row), "time")
    return make_item(row.get(text_key), row.get(time_key), row.get(cols.id or "id"), cols, where, now)


def batches(items: list[Item], size: int = BATCH) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def replay_file(path: Path, cols: Columns, speed: float = 0.0, stop: threading.Event | None = None,
                limit: int | None = None) -> Iterator[list[Item]]:
    """A file's items oldest first (a stable sort: equal times keep the file's order). speed: 0 as fast as the
    monitor goes; N plays N seconds of item time per second (86400: a day a second)."""
    if not path.is_file():
        raise FileNotFoundError(f"--stream {path}: no such file")
    items = sorted(read_items(path, cols), key=lambda it: it.time)[:limit]
    print(f"monitor: {path}: {len(items)} items from {iso(items[0].time) if items else '-'} to "
          f"{iso(items[-1].time) if items else '-'}" + (f"; {cols.skipped} rows skipped" if cols.skipped else ""),
          file=sys.stderr, flush=True)
    t0, wall0 = (items[0].time if items else 0.0), time.monotonic()
    for batch in batches(items, BATCH if speed <= 0 else 1):
        if stop is not None and stop.is_set():
            return
        if speed > 0:
            wait = (batch[0].time - t0) / speed - (time.monotonic() - wall0)
            if wait > 0 and stop is not None and stop.wait(wait):
                return
        yield batch


def watch_folder(folder: Path, cols: Columns, done: Callable[[Path], bool], stop: threading.Event,
                 poll_s: float = 1.0, now: Callable[[], float] | None = None) -> Iterator[tuple[Path, list[Item]]]:
    """(file, its items oldest first) for each new file dropped into `folder`, until `stop` is set. A file is read
    once its size has stayed the same for one poll (a file being copied in is not read half-written); names that
    start with . or ~ or end in .tmp or .part are left alone, as are files `done` says were read already (the same
    path, size and modification time)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--stream {folder}: no such folder")
    sizes: dict[Path, int] = {}
    while not stop.is_set():
        found = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FILE_TYPES
                        and not p.name.startswith((".", "~")) and not p.name.endswith((".tmp", ".part"))),
                       key=lambda p: (p.stat().st_mtime, p.name))
        for path in found:
            size = path.stat().st_size
            if sizes.get(path) != size:
                sizes[path] = size  # seen now: read it at the next poll if it has stopped growing
                continue
            if done(path) or stop.is_set():
                continue
            try:
                items = sorted(read_items(path, cols, now), key=lambda it: it.time)
            except ValueError as err:  # one bad file must not stop a watcher that runs for days
                print(f"monitor: skipped {path}: {err}", file=sys.stderr, flush=True)
                items = []
            yield path, items
        sizes = {p: n for p, n in sizes.items() if p.exists()}  # bounded: forget files that were removed
        stop.wait(poll_s)


def read_stdin(stream, cols: Columns, stop: threading.Event, now: Callable[[], float] | None = None,
               linger_s: float = 0.2) -> Iterator[list[Item]]:
    """Items from JSON Lines (or plain lines of text, timed on arrival with --clock wall) on `stream`, in batches:
    a batch goes as soon as BATCH items are in or the input pauses for linger_s, so a trickle is not held back."""
    lines: queue.Queue = queue.Queue(maxsize=4 * BATCH)  # bounded: a fast producer waits for the monitor

    def pump():
        for n, line in enumerate(stream, 1):
            lines.put((n, line))
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name="stdin").start()
    ended = False
    while not ended and not stop.is_set():
        batch: list[Item] = []
        while len(batch) < BATCH:
            try:
                got = lines.get(timeout=linger_s if batch else 0.5)
            except queue.Empty:
                break
            if got is None:
                ended = True
                break
            n, line = got
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                item = item_from_json(line, cols, f"stdin:{n}", now)
            else:
                item = make_item(line, None, None, cols, f"stdin:{n}", now)
            if item is not None:
                batch.append(item)
        if batch:
            yield batch
