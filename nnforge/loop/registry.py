"""The model registry: versions of named models, the champion and challenger aliases, and every move of them.

    nnforge registry add shoes runs/image/exp3            # version 1 of "shoes"; the first version is champion
    nnforge registry list shoes | show shoes@champion | history shoes
    nnforge registry promote shoes 2 | rollback shoes

A version points at its run folder (and export), with the run's metrics, data fingerprint, parent version and who or
what created it. Aliases (champion, challenger) name versions; each move of an alias is a history row, so rollback
is "the champion before this one" and the record can be read back. The first version of a name also fixes its
holdout: the run's test split, copied into the registry's folder, on which every later challenger is judged.

Store: SQLAlchemy, SQLite by default (`runs/registry.db`, beside the runs); `--registry URL` or NNFORGE_REGISTRY
names another, e.g. postgresql+psycopg://user:pass@host/db (the same tables; tested on SQLite). Every change is one
transaction: the store never holds half a version or an alias pointing nowhere.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    select,
)

ALIASES = ("champion", "challenger")
ROLLBACK = "rollback"  # how a rollback's history row starts
DEFAULT_URL_ENV = "NNFORGE_REGISTRY"

meta = MetaData()
versions = Table(
    "versions", meta,
    Column("name", String(200), primary_key=True), Column("version", Integer, primary_key=True),
    Column("run", String(1000), nullable=False), Column("export", String(1000)),
    Column("metrics", JSON), Column("data_fingerprint", String(100)), Column("parent", Integer),
    Column("created_by", String(200)), Column("created_at", Float, nullable=False), Column("note", String(2000)),
)
aliases = Table(
    "aliases", meta,
    Column("name", String(200), primary_key=True), Column("alias", String(50), primary_key=True),
    Column("version", Integer, nullable=False),
    ForeignKeyConstraint(["name", "version"], ["versions.name", "versions.version"]),
)
history = Table(
    "alias_history", meta,
    Column("id", Integer, primary_key=True, autoincrement=True), Column("name", String(200), nullable=False),
    Column("alias", String(50), nullable=False), Column("from_version", Integer), Column("to_version", Integer),
    Column("at", Float, nullable=False), Column("by", String(200)), Column("reason", String(2000)),
)
holdouts = Table(
    "holdouts", meta,
    Column("name", String(200), primary_key=True), Column("path", String(1000), nullable=False),
    Column("items", Integer, nullable=False), UniqueConstraint("name"),
)


class RegistryError(ValueError):
    """A name, version or alias that does not exist, or a move that is not allowed."""


@dataclass
class Version:
    name: str
    version: int
    run: str
    export: str | None
    metrics: dict
    data_fingerprint: str | None
    parent: int | None
    created_by: str | None
    created_at: float
    note: str | None
    aliases: list[str]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def default_url(runs: str | Path = "runs") -> str:
    return os.environ.get(DEFAULT_URL_ENV) or f"sqlite:///{Path(runs).resolve() / 'registry.db'}"


class Registry:
    def __init__(self, url: str | None = None, folder: str | Path | None = None):
        self.url = url or default_url()
        self.engine = create_engine(self.url)
        meta.create_all(self.engine)
        # holdout files live beside a SQLite store, else in ./registry (a database server keeps rows, not files)
        db = self.url.removeprefix("sqlite:///") if self.url.startswith("sqlite:///") else None
        self.folder = Path(folder) if folder else (Path(db).parent / "registry" if db else Path("registry"))

    # --- reading ---------------------------------------------------------------------------------------------
    def _aliases_of(self, conn, name: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for r in conn.execute(select(aliases).where(aliases.c.name == name)):
            out.setdefault(r.version, []).append(r.alias)
        return out

    def _version(self, row, names: dict[int, list[str]]) -> Version:
        return Version(row.name, row.version, row.run, row.export, row.metrics or {}, row.data_fingerprint,
                       row.parent, row.created_by, row.created_at, row.note, sorted(names.get(row.version, [])))

    def list(self, name: str) -> list[Version]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(versions).where(versions.c.name == name).order_by(versions.c.version))
            names = self._aliases_of(conn, name)
            out = [self._version(r, names) for r in rows]
        if not out:
            raise RegistryError(f"no model named {name!r} in {self.url}; add one with `nnforge registry add`")
        return out

    def get(self, ref: str) -> Version:
        """NAME@VERSION, NAME@champion, NAME@challenger, or NAME (the champion)."""
        name, _, which = ref.partition("@")
        which = which or "champion"
        found = self.list(name)
        if which.isdigit():
            match = [v for v in found if v.version == int(which)]
        elif which in ALIASES:
            match = [v for v in found if which in v.aliases]
        else:
            raise RegistryError(f"{ref!r}: expected NAME@VERSION or NAME@{'|'.join(ALIASES)}")
        if not match:
            raise RegistryError(f"{ref!r}: no such version (versions: {', '.join(str(v.version) for v in found)})")
        return match[0]

    def history(self, name: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(history).where(history.c.name == name).order_by(history.c.id))
            return [dict(r._mapping) for r in rows]

    def pointer(self, name: str, alias: str = "champion") -> Path:
        """REGISTRY_FOLDER/NAME/ALIAS.json: {"name", "version", "run"} of the version the alias names, rewritten
        after every move; `nnforge serve NAME@champion` follows this file, so a promotion or rollback reloads every
        server that serves the alias (the file is the channel, not the database, because the serving layer knows
        nothing of the registry)."""
        return self.folder / name / f"{alias}.json"

    def sync_pointers(self, name: str) -> None:
        """Rewrite NAME's alias files from the store (atomically): after each change, and by any later command, so
        a crash between the commit and the file write is repaired by the next registry command."""
        with self.engine.connect() as conn:
            current = {r.alias: r.version for r in conn.execute(select(aliases).where(aliases.c.name == name))}
            runs = {r.version: r.run for r in conn.execute(select(versions).where(versions.c.name == name))}
        for alias in ALIASES:
            path = self.pointer(name, alias)
            if alias not in current:
                path.unlink(missing_ok=True)
                continue
            body = json.dumps({"name": name, "alias": alias, "version": current[alias], "run": runs[current[alias]]})
            if path.is_file() and path.read_text() == body:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(body)
            os.replace(tmp, path)

    def holdout(self, name: str) -> Path:
        with self.engine.connect() as conn:
            row = conn.execute(select(holdouts).where(holdouts.c.name == name)).first()
        if row is None:
            raise RegistryError(f"{name!r} has no holdout (its first version fixes it)")
        return Path(row.path)

    # --- changing ----------------------------------------------------------------------------------------------
    def add(self, name: str, run: str | Path, created_by: str = "user", parent: int | None = None,
            note: str | None = None, alias: str | None = None) -> Version:
        """A new version of NAME from a finished run. The first version becomes champion and fixes the holdout
        (its test split); later ones get `alias` if given (retrain registers challengers)."""
        run = Path(run).resolve()
        meta_json = _read_json(run / "meta.json", "is it a run folder?")
        if not (run / "checkpoints" / "best.safetensors").is_file():
            raise RegistryError(f"{run}: no checkpoints/best.safetensors; only trained runs can be registered")
        report = run / "eval" / "report.json"
        metrics = _headline(_read_json(report, "")) if report.is_file() else {}
        export = str(run / "model.onnx") if (run / "model.onnx").is_file() else None
        with self.engine.begin() as conn:  # one transaction: the version, its alias and the holdout, or nothing
            last = conn.execute(select(versions.c.version).where(versions.c.name == name)
                                .order_by(versions.c.version.desc())).first()
            number = (last.version if last else 0) + 1
            conn.execute(versions.insert().values(
                name=name, version=number, run=str(run), export=export, metrics=metrics,
                data_fingerprint=meta_json.get("data_fingerprint"), parent=parent, created_by=created_by,
                created_at=time.time(), note=note))
            if last is None:
                self._fix_holdout(conn, name, run)
                self._move(conn, name, "champion", number, created_by, "first version")
            elif alias:
                self._move(conn, name, alias, number, created_by, note or "registered")
        self.sync_pointers(name)
        return self.get(f"{name}@{number}")

    def promote(self, name: str, version: int, by: str = "user", reason: str = "promoted") -> Version:
        """VERSION becomes champion (and stops being challenger)."""
        with self.engine.begin() as conn:
            self._check(conn, name, version)
            self._move(conn, name, "champion", version, by, reason)
            current = conn.execute(select(aliases).where((aliases.c.name == name)
                                                         & (aliases.c.alias == "challenger"))).first()
            if current is not None and current.version == version:
                conn.execute(aliases.delete().where((aliases.c.name == name) & (aliases.c.alias == "challenger")))
                conn.execute(history.insert().values(name=name, alias="challenger", from_version=version,
                                                     to_version=None, at=time.time(), by=by, reason=reason))
        self.sync_pointers(name)
        return self.get(f"{name}@{version}")

    def rollback(self, name: str, by: str = "user") -> Version:
        """The champion goes back to the one before it. Promotions stack up and each rollback takes one off, so two
        rollbacks go two champions back (not back and forth)."""
        stack: list[int] = []
        for h in self.history(name):
            if h["alias"] != "champion":
                continue
            if (h["reason"] or "").startswith(ROLLBACK) and len(stack) > 1:
                stack.pop()
            else:
                stack.append(h["to_version"])
        if len(stack) < 2:
            raise RegistryError(f"{name!r}: no earlier champion to roll back to")
        return self.promote(name, stack[-2], by, f"{ROLLBACK} from version {stack[-1]} to {stack[-2]}")

    def set_alias(self, name: str, alias: str, version: int, by: str = "user", reason: str = "") -> None:
        with self.engine.begin() as conn:
            self._check(conn, name, version)
            self._move(conn, name, alias, version, by, reason)
        self.sync_pointers(name)

    def clear_alias(self, name: str, alias: str, by: str = "user", reason: str = "") -> None:
        """The alias names no version any more (a refused challenger); kept in the history like every move."""
        with self.engine.begin() as conn:
            old = conn.execute(select(aliases).where((aliases.c.name == name) & (aliases.c.alias == alias))).first()
            if old is None:
                return
            conn.execute(aliases.delete().where((aliases.c.name == name) & (aliases.c.alias == alias)))
            conn.execute(history.insert().values(name=name, alias=alias, from_version=old.version, to_version=None,
                                                 at=time.time(), by=by, reason=reason))
        self.sync_pointers(name)

    def _check(self, conn, name: str, version: int) -> None:
        found = conn.execute(select(versions.c.version).where((versions.c.name == name)
                                                             & (versions.c.version == version))).first()
        if found is None:
            raise RegistryError(f"{name}@{version}: no such version")

    def _move(self, conn, name: str, alias: str, version: int, by: str, reason: str) -> None:
        if alias not in ALIASES:
            raise RegistryError(f"alias {alias!r}: expected one of {', '.join(ALIASES)}")
        old = conn.execute(select(aliases).where((aliases.c.name == name) & (aliases.c.alias == alias))).first()
        if old is None:
            conn.execute(aliases.insert().values(name=name, alias=alias, version=version))
        else:
            conn.execute(aliases.update().where((aliases.c.name == name) & (aliases.c.alias == alias))
                         .values(version=version))
        conn.execute(history.insert().values(name=name, alias=alias, from_version=old.version if old else None,
                                             to_version=version, at=time.time(), by=by, reason=reason))

    def _fix_holdout(self, conn, name: str, run: Path) -> None:
        """The run's test split, copied: every later challenger of NAME is judged on these same items."""
        split = _read_json(run / "split.json", "the first version must carry its test split")
        items = split.get("test") or []
        if not items:
            raise RegistryError(f"{run}: no test split to fix as {name!r}'s holdout; train with a test split")
        path = self.folder / name / "holdout.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"from_run": str(run), "items": items}))
        conn.execute(holdouts.insert().values(name=name, path=str(path), items=len(items)))


def _read_json(path: Path, hint: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path}: missing{'; ' + hint if hint else ''}") from None
    except json.JSONDecodeError as err:
        raise RegistryError(f"{path}: not valid JSON ({err})") from None


def _headline(report: dict) -> dict:
    keys = ("accuracy", "macro_avg", "nll", "ece", "n", "split")
    out = {k: report[k] for k in keys if k in report}
    if "macro_avg" in out:
        out["macro_f1"] = out.pop("macro_avg")["f1"]
    return out
