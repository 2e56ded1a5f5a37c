"""The gate: champion against challenger; the challenger serves only if it is not worse.

    nnforge gate shoes [--tolerance 0.01] [--class-tolerance 0.1] [--dry-run] [--reload URL --token T]

Both models answer the same items: the name's frozen holdout (the first version's test split, fixed at
registration) and the fresh slice (a quarter of the newly labelled items, which retrain never trains on). The
challenger is promoted only if all of these hold, and the decision report names the first that does not:

- its run finished cleanly (meta.json outcome "finished": an interrupted, diverged or failed run is never promoted)
  and every logged metric is finite;
- holdout accuracy is no more than --tolerance below the champion's (default 0.01: one point);
- no class's holdout recall drops by more than --class-tolerance (default 0.1), so a gain on the new traffic cannot
  hide a class the model has forgotten. Why not tighter: with 100 holdout items a class's recall has a standard
  error near 4 points, and two equally good models trade 5 to 8 points between confusable classes (shirt and
  T-shirt); in a small smoke run of the benchmark (60 images per class) 0.05 refused challengers 3 to 7 points
  better overall;
- on the fresh slice it is not worse than the champion beyond --tolerance either.

Promotion moves the champion alias in the registry (one transaction, kept in the history) and rewrites the pointer
file that `nnforge serve NAME@champion` follows, so every serving process loads the new champion without a dropped
request; --reload also POSTs /v1/reload to servers that do not follow the file. A refused challenger stays
registered, loses the challenger alias, and the history says why. The decision report is HTML
(REGISTRY/NAME/decisions/vN.html: both models side by side, per-class deltas, the reason) with a JSON twin.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nnforge.loop.registry import Registry, RegistryError, Version
from nnforge.loop.retrain import LOOP_FILE


@dataclass
class Decision:
    name: str
    champion: int
    challenger: int
    promote: bool
    reason: str
    checks: list[dict] = field(default_factory=list)   # {"check", "ok", "detail"}
    scores: dict = field(default_factory=dict)         # slice -> {"champion": {...}, "challenger": {...}}
    report: str = ""
    promoted: bool = False                             # promote and not a dry run


def score(run: str | Path, pairs: list, classes: list[str]) -> dict:
    """accuracy, per-class recall and n of a run's model on (input, label) pairs; unreadable inputs are counted."""
    from nnforge.inference import Loaded

    if not pairs:
        return {"n": 0}
    loaded = Loaded(Path(run), device="cpu")
    if list(loaded.classes) != list(classes):
        raise RegistryError(f"{run}: classes {loaded.classes} differ from the champion's {classes}")
    index = {c: i for i, c in enumerate(classes)}
    items, labels = [p for p, _ in pairs], np.array([index[y] for _, y in pairs])
    pred = np.full(len(items), -1)
    skipped = 0
    for good, raw, failed in loaded.chunks(items):
        skipped += len(failed)
        if raw is not None:
            pred[np.asarray(good)] = loaded.output.finish(raw).argmax(1)
    ok = pred >= 0
    recall = {}
    for c, i in index.items():
        mask = ok & (labels == i)
        if mask.any():
            recall[c] = float((pred[mask] == i).mean())
    acc = float((pred[ok] == labels[ok]).mean()) if ok.any() else float("nan")
    return {"n": int(ok.sum()), "skipped": skipped, "accuracy": acc, "recall": recall}


def clean_run(run: Path) -> tuple[bool, str]:
    """(ok, why): finished, and every logged metric finite."""
    try:
        meta = json.loads((run / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        return False, f"{run}/meta.json unreadable ({err})"
    outcome = meta.get("outcome")
    if outcome != "finished":
        detail = f": {meta['outcome_detail']}" if meta.get("outcome_detail") else ""
        return False, f"its run did not finish cleanly (outcome: {outcome or 'unknown'}{detail})"
    metrics = run / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                for k, v in row.items():
                    try:
                        if v not in (None, "") and not math.isfinite(float(v)):
                            return False, f"metrics.csv:{line}: {k} is {v}"
                    except ValueError:
                        continue
    return True, "finished; every logged metric finite"


def decide(name: str, champion: Version, challenger: Version, holdout: list, fresh: list, tolerance: float,
           class_tolerance: float) -> Decision:
    classes = json.loads((Path(champion.run) / "meta.json").read_text())["classes"]
    d = Decision(name, champion.version, challenger.version, False, "")
    ok, why = clean_run(Path(challenger.run))
    d.checks.append({"check": "clean run", "ok": ok, "detail": why})
    if ok:  # a broken run is not even scored: its checkpoint may not load
        for slice_name, pairs in (("holdout", holdout), ("fresh", fresh)):
            d.scores[slice_name] = {"champion": score(champion.run, pairs, classes),
                                    "challenger": score(challenger.run, pairs, classes)}
        h = d.scores["holdout"]
        delta = h["challenger"]["accuracy"] - h["champion"]["accuracy"]
        d.checks.append({"check": "holdout accuracy", "ok": bool(math.isfinite(delta) and delta >= -tolerance),
                         "detail": f"{h['challenger']['accuracy']:.4f} vs {h['champion']['accuracy']:.4f} "
                                   f"({delta:+.4f}; tolerance {tolerance:g}, n {h['champion']['n']})"})
        drops = {c: h["challenger"]["recall"].get(c, 0.0) - r for c, r in h["champion"]["recall"].items()}
        worst = min(drops, key=drops.get) if drops else None
        d.checks.append({"check": "per-class holdout recall",
                         "ok": worst is None or drops[worst] >= -class_tolerance,
                         "detail": "no classes" if worst is None else
                         f"largest drop {worst!r} {drops[worst]:+.4f} (tolerance {class_tolerance:g})"})
        f = d.scores["fresh"]
        if f["champion"]["n"]:
            fd = f["challenger"]["accuracy"] - f["champion"]["accuracy"]
            d.checks.append({"check": "fresh slice accuracy", "ok": bool(math.isfinite(fd) and fd >= -tolerance),
                             "detail": f"{f['challenger']['accuracy']:.4f} vs {f['champion']['accuracy']:.4f} "
                                       f"({fd:+.4f}; n {f['champion']['n']})"})
        else:
            d.checks.append({"check": "fresh slice accuracy", "ok": True, "detail": "no fresh items yet"})
    failed = [c for c in d.checks if not c["ok"]]
    d.promote = not failed
    d.reason = (f"promoted: {'; '.join(c['check'] + ' ' + c['detail'] for c in d.checks[1:3])}" if d.promote
                else f"refused: {failed[0]['check']}: {failed[0]['detail']}")
    return d


def gate(name: str, registry: Registry | None = None, tolerance: float = 0.01, class_tolerance: float = 0.1,
         dry_run: bool = False, reload: list[str] = (), token: str | None = None, by: str = "gate") -> Decision:
    """Decide on NAME's challenger, write the decision report, and promote it (unless dry_run) if it passes."""
    reg = registry or Registry()
    champion, challenger = reg.get(f"{name}@champion"), reg.get(f"{name}@challenger")
    holdout = [tuple(p) for p in json.loads(reg.holdout(name).read_text())["items"]]
    state_file = Path(challenger.run) / LOOP_FILE
    fresh = [tuple(p) for p in json.loads(state_file.read_text())["fresh"]] if state_file.is_file() else []
    d = decide(name, champion, challenger, holdout, fresh, tolerance, class_tolerance)
    d.report = str(write_decision(reg.folder / name / "decisions", d, champion, challenger))
    print(f"gate: {name}@{challenger.version} against champion {name}@{champion.version}: {d.reason}")
    print(f"gate: decision report {d.report}")
    if dry_run:
        return d
    if d.promote:
        reg.promote(name, challenger.version, by=by, reason=d.reason[:2000])
        d.promoted = True
        for url in reload:
            reload_server(url, challenger.run, token)
    else:
        reg.clear_alias(name, "challenger", by=by, reason=d.reason[:2000])
    return d


def reload_server(url: str, run: str, token: str | None = None, timeout: float = 300) -> dict:
    """POST /v1/reload to a server that does not follow the registry's pointer file."""
    token = token or os.environ.get("NNFORGE_TOKEN")
    req = urllib.request.Request(url.rstrip("/") + "/v1/reload", data=json.dumps({"run": run}).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = json.loads(resp.read())
    print(f"gate: {url} now serves {run}")
    return body


def _row(cells: list, head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def write_decision(folder: Path, d: Decision, champion: Version, challenger: Version) -> Path:
    """decisions/vN.html (both models, per-class deltas, the reason) and vN.json, written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"v{d.challenger}.html"
    parts = [f"<h1>{html.escape(d.name)}: version {d.challenger} against champion {d.champion}</h1>",
             f"<p class='{'ok' if d.promote else 'no'}'><b>{html.escape(d.reason)}</b></p>",
             f"<p>{time.strftime('%Y-%m-%d %H:%M:%S')}. Champion run {html.escape(champion.run)}; challenger run "
             f"{html.escape(challenger.run)}.</p>", "<h2>Checks</h2><table>",
             _row(["check", "passed", "detail"], head=True),
             *[_row([c["check"], "yes" if c["ok"] else "NO", c["detail"]]) for c in d.checks], "</table>"]
    for slice_name, s in d.scores.items():
        a, b = s["champion"], s["challenger"]
        if not a.get("n"):
            continue
        parts += [f"<h2>{slice_name} ({a['n']} items)</h2><table>",
                  _row(["", f"champion v{d.champion}", f"challenger v{d.challenger}", "delta"], head=True),
                  _row(["accuracy", _fmt(a["accuracy"]), _fmt(b["accuracy"]), f"{b['accuracy'] - a['accuracy']:+.4f}"])]
        for c in a["recall"]:
            rb = b["recall"].get(c, 0.0)
            parts.append(_row([f"recall {c}", _fmt(a["recall"][c]), _fmt(rb), f"{rb - a['recall'][c]:+.4f}"]))
        parts.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.ok{color:#1a7f37}.no{color:#cf222e}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>gate {html.escape(d.name)} "
            f"v{d.challenger}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    for target, text in ((path, page), (path.with_suffix(".json"), json.dumps(asdict(d), indent=2))):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return path
