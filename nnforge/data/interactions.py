"""User-item interactions and item side information, from the files recommender data comes in.

    python -c "from nnforge.data.interactions import read_interactions; print(read_interactions('ml-100k').report)"

Three layouts, told apart by what the path holds:

    interactions.csv / .tsv   a header naming user, item and optional rating and timestamp columns (common names are
                              found: user, user_id, userId, ...); item side information from --items (an id column
                              and text columns such as title, genres, description)
    a folder of RecBole's     NAME.inter (user_id:token, item_id:token, rating:float, timestamp:float), NAME.item
    atomic files              (item_id and its fields); tab-separated, typed headers: what the offline ML-100k is
    MovieLens' own files      u.data (user, item, rating, timestamp, no header) with u.item ('|'-separated, the 19
                              genre flags named by u.genre) beside it

Every file goes through data/tables.py (encodings, line numbers). Rows that cannot be used are skipped with their
file and line (report["skipped"]): malformed lines, empty ids, ratings or timestamps that are not numbers, items
missing from the item file, and a user-item pair seen again (its first row is kept). Ratings become implicit
feedback with `min_rating` (kept: rating >= min_rating). Items listed in the item file without any interaction stay
in the catalogue: a text-aware model can still recommend them.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from nnforge.data.rules import DataError
from nnforge.data.tables import Table, read_table

USER_NAMES = ("user", "user_id", "userid", "uid", "customer_id", "visitor_id")
ITEM_NAMES = ("item", "item_id", "itemid", "iid", "movie_id", "movieid", "product_id", "article_id")
RATING_NAMES = ("rating", "score", "stars")
TIME_NAMES = ("timestamp", "time", "ts", "datetime", "date")
TITLE_HINTS = ("title", "name")
# MovieLens-100k's genre flags, in the order of u.item's last 19 columns (u.genre names them when it is there)
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
REPORT_MAX = 1000  # skipped rows and repeats listed in data_report.json; the counts are always complete


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Interactions:
    """Interactions as index arrays, with the ids and the text of every item in the catalogue."""

    source: str
    layout: str                   # csv | recbole | movielens
    user_ids: list[str]           # user index -> id
    item_ids: list[str]           # item index -> id (the catalogue: interacted items, and the item file's others)
    users: np.ndarray             # (n,) int64
    items: np.ndarray             # (n,) int64
    ratings: np.ndarray | None    # (n,) float32
    times: np.ndarray | None      # (n,) float64, seconds
    titles: list[str]             # per item, for answers ("" when unknown)
    texts: list[str]              # per item, what the item tower reads ("" when unknown)
    report: dict = field(default_factory=dict)

    @property
    def has_text(self) -> bool:
        return any(t.strip() for t in self.texts)

    def __len__(self) -> int:
        return len(self.users)


# ----------------------------------------------------------------------------------------------------------------
# columns


def find_column(header: list[str], given: str | None, names: tuple[str, ...], what: str, flag: str,
                path: Path, required: bool = True) -> str | None:
    """The column to read: the one given, else the first header name that is a common name for `what`."""
    if given is not None:
        if given not in header:
            raise DataError(f"{path}: no column '{given}' ({flag}); the header has {header}")
        return given
    plain = {h.lower().replace("-", "_").split(":")[0]: h for h in header}
    for n in names:
        if n in plain:
            return plain[n]
    if required:
        raise DataError(f"{path}: no {what} column; the header has {header}. Name it with {flag}, or call it one "
                        f"of {', '.join(names[:4])}")
    return None


def _delimiter(path: Path) -> str:
    if path.suffix.lower() in (".tsv", ".tab", ".inter", ".item"):
        return "\t"
    with path.open("rb") as f:
        first = f.readline()
    return "\t" if first.count(b"\t") > first.count(b",") else ","


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _time(text: str) -> float | None:
    """Seconds: a number as is, or an ISO 8601 date/time (2021-03-04, 2021-03-04T10:00:00)."""
    value = _number(text)
    if value is not None:
        return value
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


class _Skips:
    """Rows that were not used, with their file:line and reason (counts complete, the list bounded)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.counts: dict[str, int] = {}

    def add(self, where: str, reason: str, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.rows) < REPORT_MAX:
            self.rows.append({"path": where, "reason": reason})

    def table(self, table: Table) -> None:
        for s in table.skipped:
            self.add(s["path"], s["reason"], "malformed")


# ----------------------------------------------------------------------------------------------------------------
# items


@dataclass
class ItemTable:
    ids: list[str]
    titles: dict[str, str]
    texts: dict[str, str]


def read_items(path: Path, id_col: str | None, text_cols: list[str] | None, title_col: str | None,
               skips: _Skips | None = None, delimiter: str | None = None, names: list[str] | None = None,
               quoting: bool = True, describe: Callable[[list[str], dict[str, int]], str] | None = None) -> ItemTable:
    """An item file: ids, titles and the text the item tower reads (the text columns joined with '. ')."""
    skips = skips if skips is not None else _Skips()
    delim = delimiter or _delimiter(path)
    probe = read_table(path, delim, {}, names=names, quoting=quoting)
    header = probe.header
    plain = [h.split(":")[0] for h in header]
    # the interactions' item column when the item file has it too, else a common name for an item id
    idc = find_column(plain, id_col if id_col in plain else None, ITEM_NAMES, "item id", "--item-col", path)
    id_at = plain.index(idc)
    if text_cols:
        missing = [c for c in text_cols if c not in plain]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (--item-text-cols); the header has {plain}")
        text_at = [plain.index(c) for c in text_cols]
    else:
        text_at = [i for i in range(len(plain)) if i != id_at]
    if title_col is not None and title_col not in plain:
        raise DataError(f"{path}: no column '{title_col}' (--item-title-col); the header has {plain}")
    title_at = plain.index(title_col) if title_col else next(
        (i for i in text_at if any(h in plain[i].lower() for h in TITLE_HINTS)), text_at[0] if text_at else None)
    skips.table(probe)
    ids, titles, texts, first = [], {}, {}, {}
    for line, rec in probe.rows:
        item = rec[id_at].strip()
        if not item:
            skips.add(f"{path}:{line}", "empty item id", "item_file")
            continue
        if item in first:
            skips.add(f"{path}:{line}", f"item '{item}' listed again (first on line {first[item]})", "item_file")
            continue
        first[item] = line
        ids.append(item)
        titles[item] = rec[title_at].strip() if title_at is not None else ""
        if describe is not None:
            texts[item] = describe(rec, {h: i for i, h in enumerate(plain)})
        else:
            texts[item] = ". ".join(rec[i].strip() for i in text_at if rec[i].strip())
    return ItemTable(ids, titles, texts)


# ----------------------------------------------------------------------------------------------------------------
# the three layouts


@dataclass
class _Source:
    layout: str
    inter: Path
    items: Path | None
    genres: Path | None = None


def locate(data: str | Path, items: str | Path | None = None) -> _Source:
    """Which layout `data` is in, and where its item file lies."""
    p = Path(data)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    given = Path(items) if items is not None else None
    if given is not None and not given.is_file():
        raise DataError(f"{given}: no such item file (--items)")
    if p.is_dir():
        inters = sorted(p.glob("*.inter"))
        if len(inters) > 1:
            raise DataError(f"{p}: several .inter files ({', '.join(i.name for i in inters)}); pass one of them")
        if inters:
            p = inters[0]
        elif (p / "u.data").is_file():
            p = p / "u.data"
        else:
            raise DataError(f"{p}: expected RecBole atomic files (NAME.inter, NAME.item) or MovieLens' u.data in "
                            "the folder, or pass an interactions CSV/TSV file")
    if p.suffix == ".inter":
        item = p.with_suffix(".item")
        return _Source("recbole", p, given or (item if item.is_file() else None))
    if p.name == "u.data":
        item, genre = p.parent / "u.item", p.parent / "u.genre"
        return _Source("movielens", p, given or (item if item.is_file() else None),
                       genre if genre.is_file() else None)
    return _Source("csv", p, given)


def _movielens_genres(path: Path | None) -> list[str]:
    if path is None:
        return list(ML100K_GENRES)
    table = read_table(path, "|", {}, names=["genre", "index"], quoting=False)
    names = [rec[0].strip() for _, rec in table.rows if rec[0].strip()]
    return names or list(ML100K_GENRES)


def _read_source(src: _Source, cfg: dict, skips: _Skips) -> tuple[Table, dict[str, int | None], ItemTable | None]:
    """(interaction table, column indices of user/item/rating/time, item table)."""
    if src.layout == "movielens":
        table = read_table(src.inter, "\t", {}, names=["user", "item", "rating", "timestamp"], quoting=False)
        cols = {"user": 0, "item": 1, "rating": 2, "time": 3}
        items = None
        if src.items is not None:
            genres = _movielens_genres(src.genres)
            names = ["item", "title", "release", "video_release", "url", *genres]

            def describe(rec: list[str], at: dict[str, int]) -> str:
                flagged = [g for g in genres if rec[at[g]].strip() == "1"]
                return f"{rec[1].strip()}. {', '.join(flagged)}" if flagged else rec[1].strip()

            items = read_items(src.items, "item", None, "title", skips, "|", names, quoting=False,
                               describe=describe)
        return table, cols, items
    recbole = src.layout == "recbole"
    delim = "\t" if recbole else _delimiter(src.inter)
    table = read_table(src.inter, delim, {}, quoting=not recbole)
    plain = [h.split(":")[0] for h in table.header]
    user = find_column(plain, cfg.get("user_col"), USER_NAMES, "user id", "--user-col", src.inter)
    item = find_column(plain, cfg.get("item_col"), ITEM_NAMES, "item id", "--item-col", src.inter)
    rating = find_column(plain, cfg.get("rating_col"), RATING_NAMES, "rating", "--rating-col", src.inter, False)
    time = find_column(plain, cfg.get("time_col"), TIME_NAMES, "timestamp", "--time-col", src.inter, False)
    cols = {"user": plain.index(user), "item": plain.index(item),
            "rating": plain.index(rating) if rating else None, "time": plain.index(time) if time else None}
    items = None
    if src.items is not None:
        text_cols = [c.strip() for c in cfg["item_text_cols"].split(",") if c.strip()] \
            if cfg.get("item_text_cols") else None
        items = read_items(src.items, item, text_cols, cfg.get("item_title_col"), skips,
                           "\t" if src.items.suffix in (".item", ".tsv") else None, quoting=not recbole)
    return table, cols, items


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def read_interactions(data: str | Path, items: str | Path | None = None, *, user_col: str | None = None,
                      item_col: str | None = None, rating_col: str | None = None, time_col: str | None = None,
                      item_text_cols: str | None = None, item_title_col: str | None = None,
                      min_rating: float | None = None, log: Callable[[str], None] = _log) -> Interactions:
    """Read interactions (and item side information) from any of the three layouts; DataError when nothing usable
    remains or a required column is missing. Skipped rows are in .report with their file and line."""
    src = locate(data, items)
    skips = _Skips()
    cfg = {"user_col": user_col, "item_col": item_col, "rating_col": rating_col, "time_col": time_col,
           "item_text_cols": item_text_cols, "item_title_col": item_title_col}
    table, cols, item_table = _read_source(src, cfg, skips)
    skips.table(table)
    known_items = set(item_table.ids) if item_table is not None else None
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {i: n for n, i in enumerate(item_table.ids)} if item_table is not None else {}
    users, items_, ratings, times = [], [], [], []
    seen: dict[tuple[int, int], int] = {}
    below = 0
    rc, tc = cols["rating"], cols["time"]
    for line, rec in table.rows:
        where = f"{src.inter}:{line}"
        u, i = rec[cols["user"]].strip(), rec[cols["item"]].strip()
        if not u or not i:
            skips.add(where, "empty user id" if not u else "empty item id", "empty_id")
            continue
        r = t = None
        if rc is not None:
            r = _number(rec[rc])
            if r is None:
                skips.add(where, f"rating {rec[rc]!r} is not a number", "bad_rating")
                continue
        if tc is not None:
            t = _time(rec[tc])
            if t is None:
                skips.add(where, f"timestamp {rec[tc]!r} is neither a number nor an ISO date", "bad_time")
                continue
        if known_items is not None and i not in known_items:
            skips.add(where, f"item '{i}' is not in the item file {src.items.name}", "unknown_item")
            continue
        if min_rating is not None and r is not None and r < min_rating:
            below += 1
            continue
        ui = user_index.setdefault(u, len(user_index))
        ii = item_index.setdefault(i, len(item_index))
        if (ui, ii) in seen:
            skips.add(where, f"user '{u}' and item '{i}' again (first on line {seen[(ui, ii)]}); the first row is "
                             "kept", "repeated_pair")
            continue
        seen[(ui, ii)] = line
        users.append(ui)
        items_.append(ii)
        ratings.append(r)
        times.append(t)
    if min_rating is not None and rc is None:
        raise DataError(f"{src.inter}: --min-rating {min_rating} needs a rating column; the header has "
                        f"{table.header}")
    if not users:
        first = skips.rows[0] if skips.rows else None
        raise DataError(f"{src.inter}: no usable interactions" + (f" (first problem: {first['path']}: "
                                                                   f"{first['reason']})" if first else ""))
    item_ids = list(item_index)
    titles = [item_table.titles.get(i, "") for i in item_ids] if item_table else list(item_ids)
    texts = [item_table.texts.get(i, "") for i in item_ids] if item_table else [""] * len(item_ids)
    files = [src.inter] + ([src.items] if src.items else [])
    report = {"layout": src.layout, "interactions_file": str(src.inter),
              "items_file": str(src.items) if src.items else None, "fingerprint": _fingerprint(files),
              "interactions": len(users), "users": len(user_index), "items": len(item_ids),
              "items_without_interactions": len(item_ids) - len(set(items_)),
              "rows_read": len(table.rows), "below_min_rating": below, "skipped_counts": skips.counts,
              "skipped": skips.rows}
    inter = Interactions(str(data), src.layout, list(user_index), item_ids, np.asarray(users, np.int64),
                         np.asarray(items_, np.int64), np.asarray(ratings, np.float32) if rc is not None else None,
                         np.asarray(times, np.float64) if tc is not None else None, titles, texts, report)
    dropped = sum(v for k, v in skips.counts.items())
    note = f"; {dropped} rows skipped or repeated (data_report.json lists them; first: " \
           f"{skips.rows[0]['path']}: {skips.rows[0]['reason']})" if dropped else ""
    log(f"data: {len(inter)} interactions of {len(user_index)} users with {len(item_ids)} items ({src.layout}"
        f"{', item text from ' + src.items.name if src.items else ', no item text'}"
        f"{f', {below} below --min-rating {min_rating:g} left out' if below else ''}){note}")
    return inter
