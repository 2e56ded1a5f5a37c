"""report.html: one self-contained page a person reads to judge a run.

    path = write_report(Path("runs/image/exp1"))   # -> runs/image/exp1/report.html
    add_section(run_dir, "samples", "Samples", html)   # a task's own section, kept in eval/sections.json

The page reads what the run folder holds (config.yaml, meta.json, data_report.json, metrics.csv, eval/) and
works at any stage of a run's life: a section whose files are missing says "not available yet", and a file
that cannot be parsed is named in a warning inside its section instead of stopping the page. Pictures are
PNGs embedded as data URIs and styles are inline, so the file can be mailed or archived on its own.

Every task gets the summary, data, training curves and its eval/report.json's metrics; classifiers also get the
confusion, calibration and worst-mistakes sections; a task adds its own sections (sample grids, episodes) with
add_section, and they are part of every later rebuild of the page.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from nnforge.evaluation import _html, plots
from nnforge.evaluation._html import esc, na

SECTIONS = (("summary", "Summary"), ("data", "Data"), ("curves", "Training curves"), ("metrics", "Metrics"),
            ("confusion", "Confusion"), ("calibration", "Calibration"), ("mistakes", "Worst mistakes"))
KEY_CONFIG = ("data", "env", "algo", "preset", "steps", "envs", "model", "epochs", "batch_size", "optimizer", "lr",
              "weight_decay", "schedule",
              "warmup_epochs", "label_smoothing", "img_size", "ema", "early_stop", "monitor", "class_weights",
              "sampler", "precision", "pretrained", "weights", "seed")
LIST_MAX = 50  # rows of skipped files / duplicates shown before "and N more"


@dataclass
class _RunFiles:
    """What the run folder holds; a missing file is None, an unreadable one also gets an `errors` entry."""

    path: Path
    config: dict | None = None
    meta: dict | None = None
    data: dict | None = None
    metrics: dict[str, list[float]] | None = None
    report: dict | None = None
    mistakes: dict | None = None
    sections: list | None = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def classifier(self) -> bool:
        """A classification run (its model outputs class probabilities), or one from before tasks recorded io."""
        io = (self.meta or {}).get("io")
        return io is None or io.get("output", {}).get("kind") == "probs"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"


def _load(files: _RunFiles, rel: str, parse: Callable[[Path], Any], want: type | None = dict) -> Any:
    p = files.path / rel
    if not p.is_file():
        return None
    try:
        value = parse(p)
    except (OSError, ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
        files.errors[rel] = f"{rel} could not be read: {e}"
        return None
    if want is not None and not isinstance(value, want):
        files.errors[rel] = f"{rel}: expected a {want.__name__} at the top level, got {type(value).__name__}"
        return None
    return value


def _read_run(run_dir: Path) -> _RunFiles:
    f = _RunFiles(run_dir)
    f.config = _load(f, "config.yaml", lambda p: yaml.safe_load(p.read_text(encoding="utf-8")))
    f.meta = _load(f, "meta.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    f.data = _load(f, "data_report.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    f.metrics = _load(f, "metrics.csv", plots.read_metrics_csv)
    f.report = _load(f, "eval/report.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    f.mistakes = _load(f, "eval/mistakes.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    f.sections = _load(f, "eval/sections.json", lambda p: json.loads(p.read_text(encoding="utf-8")), list)
    return f


# --- small formatting helpers ------------------------------------------------------------------------------
def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "none" if v is None else str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3g}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.{digits}g}"
    return str(v)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _kv(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{esc(k)}</td><td class=\"l\">{esc(_num(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _table(header: list[str], rows: list[list[str]], left: int = 1, sum_last: bool = False) -> str:
    """rows hold already-escaped cells; the first `left` columns are left-aligned."""
    th = "".join(f'<th{" class=l" if i < left else ""}>{h}</th>' for i, h in enumerate(header))
    trs = []
    for r, row in enumerate(rows):
        cls = ' class="sum"' if sum_last and r == len(rows) - 1 else ""
        tds = "".join(f'<td{" class=l" if i < left else ""}>{c}</td>' for i, c in enumerate(row))
        trs.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


def _cards(items: list[tuple[str, str]]) -> str:
    cards = "".join(f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
                    for k, v in items)
    return f'<div class="cards">{cards}</div>'


def _picture(png_path: Path, alt: str) -> str:
    return _html.img_tag(png_path.read_bytes(), alt)


def _warnings(files: _RunFiles, *rels: str) -> str:
    return "".join(f'<p class="warn">{esc(files.errors[r])}</p>' for r in rels if r in files.errors)


def _best(files: _RunFiles) -> tuple[str, float, int] | None:
    """(monitored metric, best value, its epoch) from metrics.csv, using the monitor in config.yaml."""
    cols = files.metrics or {}
    monitor = str((files.config or {}).get("monitor", "val_acc"))
    values = cols.get(monitor) or []
    epochs = cols.get("epoch") or list(range(1, len(values) + 1))
    pairs = [(v, int(e)) for v, e in zip(values, epochs, strict=False)
             if not (math.isnan(v) or math.isnan(e))]
    if not pairs:
        return None
    mode = (files.meta or {}).get("monitor_mode") or ("min" if monitor.endswith("loss") else "max")
    sign = 1.0 if mode == "min" else -1.0
    v, e = min(pairs, key=lambda t: (sign * t[0], t[1]))  # ties go to the earliest epoch
    return monitor, v, e


# --- sections ----------------------------------------------------------------------------------------------
def _summary(files: _RunFiles) -> str:
    meta, cfg, rep = files.meta or {}, files.config or {}, files.report
    out = [_warnings(files, "meta.json", "config.yaml")]
    cards = []
    if rep and "accuracy" in rep:
        cards.append((f"{rep.get('split', 'test')} accuracy", _pct(rep["accuracy"])))
        cards.append(("macro F1", f"{rep['macro_avg']['f1']:.3f}"))
    elif rep:
        cards += [(f"{rep.get('split', 'test')} {k}", _num(v)) for k, v in _scalars(rep)[:3]]
    best = _best(files)
    if best:
        monitor, v, e = best
        cards.append((f"best {monitor} (epoch {e})", f"{v:.4f}"))
    cols = files.metrics or {}
    if cols.get("epoch"):
        cards.append(("epochs trained", str(len(cols["epoch"]))))
    times = [t for t in cols.get("epoch_time_s", []) if not math.isnan(t)]
    if times:
        total = sum(times)
        cards.append(("training time", f"{total / 60:.1f} min" if total >= 60 else f"{total:.1f} s"))
    if cards:
        out.append(_cards(cards))
    if not meta and not cfg:
        out.append(na("meta.json and config.yaml: not available yet."))
        return "".join(out)

    classes = [str(c) for c in meta.get("classes") or (rep or {}).get("classes") or []]
    shown = ", ".join(classes[:30]) + (f", … ({len(classes) - 30} more)" if len(classes) > 30 else "")
    run_rows = [("task", meta.get("task", cfg.get("task", "–"))),
                ("model", meta.get("model", cfg.get("model", "–"))),
                ("input", meta.get("input", meta.get("kind", "–"))),
                ("classes", f"{len(classes)}: {shown}" if classes else "–"),
                ("seed", meta.get("seed", cfg.get("seed", "–"))), ("created", meta.get("created", "–")),
                ("run folder", str(files.path))]
    if best:
        run_rows.append(("best epoch", f"{best[2]} ({best[0]} {best[1]:.4f})"))
    for k in ("git_commit", "commit", "data_fingerprint", "input_shape"):
        if k in meta:
            run_rows.append((k.replace("_", " "), meta[k]))
    cfg_rows = [(k, cfg[k]) for k in KEY_CONFIG if k in cfg]
    versions = meta.get("versions") or {}
    ver_rows = list(versions.items()) if isinstance(versions, dict) else [("versions", versions)]
    out.append('<div class="cols">')
    out.append(f"<div><h3>Run</h3>{_kv(run_rows)}</div>")
    cfg_html = _kv(cfg_rows) if cfg_rows else na("config.yaml: not available yet.")
    ver_html = _kv(ver_rows) if ver_rows else na("no versions recorded in meta.json")
    out.append(f"<div><h3>Key configuration</h3>{cfg_html}<h3>Versions</h3>{ver_html}</div>")
    out.append("</div>")
    if cfg:
        out.append(f"<details><summary>Full configuration (config.yaml)</summary>"
                   f"<pre>{esc(yaml.safe_dump(cfg, sort_keys=False))}</pre></details>")
    return "".join(out)


def _data(files: _RunFiles) -> str:
    d = files.data
    if d is None:
        return _warnings(files, "data_report.json") + na("data_report.json: not available yet.")
    out = []
    facts = [(k, d[k]) for k in ("data", "files", "usable", "size", "channels", "cache") if k in d]
    if facts:
        out.append(_kv(facts))
    counts = d.get("counts") or {}
    splits = [s for s, c in counts.items() if c]
    if splits:
        order = list((files.meta or {}).get("classes") or [])
        for s in splits:
            order += [c for c in counts[s] if c not in order]
        rows = []
        for c in order:
            per = [int(counts[s].get(c, 0)) for s in splits]
            rows.append([esc(c), *(str(v) for v in per), str(sum(per))])
        totals = [sum(int(v) for v in counts[s].values()) for s in splits]
        rows.append(["total", *(str(t) for t in totals), str(sum(totals))])
        out.append("<h3>Examples per split and class</h3>")
        out.append(_table(["class", *(esc(s) for s in splits), "all"], rows, sum_last=True))
        train = [v for v in counts.get("train", {}).values() if v]
        if train and max(train) > 3 * min(train):
            out.append(f'<p class="warn">Classes are imbalanced: {min(train)} to {max(train)} training '
                       "examples per class.</p>")
    else:
        out.append(na("no per-split counts in data_report.json"))

    skipped = d.get("skipped") or []
    out.append(f"<h3>Skipped files ({len(skipped)})</h3>")
    if skipped:
        rows = [[f'<span class="path">{esc(s.get("path", "?"))}</span>', esc(s.get("reason", "?"))]
                for s in skipped[:LIST_MAX]]
        out.append(_table(["path", "reason"], rows, left=2))
        if len(skipped) > LIST_MAX:
            out.append(f'<p class="muted">… and {len(skipped) - LIST_MAX} more in data_report.json</p>')
    else:
        out.append('<p class="muted">None: every file could be used.</p>')

    dups = d.get("duplicates") or []
    out.append(f"<h3>Duplicates ({len(dups)} groups)</h3>")
    if dups:
        leaks = [g for g in dups if isinstance(g, dict) and g.get("leak")]
        clash = [g for g in dups if isinstance(g, dict) and len(g.get("labels") or []) > 1]
        if leaks:
            out.append(f'<p class="warn">{len(leaks)} group(s) of identical files appear in more than one '
                       "split: test results are optimistic (leakage).</p>")
        if clash:
            out.append(f'<p class="warn">{len(clash)} group(s) of identical files carry different '
                       "labels.</p>")
        rows = []
        for g in dups[:LIST_MAX]:
            if not isinstance(g, dict):
                rows.append([esc(g), "", ""])
                continue
            paths = list(g.get("paths") or [])
            shown = "<br>".join(esc(p) for p in paths[:4])
            if len(paths) > 4:
                shown += f"<br>… {len(paths) - 4} more"
            splits_ = ", ".join(map(str, g.get("splits") or []))
            labels = ", ".join(map(str, g.get("labels") or []))
            rows.append([f'<span class="path">{shown}</span>', esc(splits_), esc(labels)])
        out.append(_table(["identical files", "splits", "labels"], rows, left=3))
        if len(dups) > LIST_MAX:
            out.append(f'<p class="muted">… and {len(dups) - LIST_MAX} more groups in data_report.json</p>')
    else:
        out.append('<p class="muted">No duplicate files found.</p>')
    return "".join(out)


def _curves(files: _RunFiles) -> str:
    if not files.metrics or not any(files.metrics.values()):
        return _warnings(files, "metrics.csv") + na("metrics.csv: not available yet (no epoch has finished).")
    best = _best(files)
    png = plots.plot_training_curves(files.path / "metrics.csv", files.eval_dir / "training_curves.png",
                                     best_epoch=best[2] if best else None)
    note = (f'<p class="muted">Dotted green line: best epoch by {esc(best[0])}.</p>' if best else "")
    return _picture(png, "training curves: loss, accuracy and learning rate per epoch") + note


def _eval_png(files: _RunFiles, name: str, draw: Callable[[Path], Path]) -> Path:
    """A picture from eval/, drawn from report.json if evaluate did not leave one."""
    p = files.eval_dir / name
    return p if p.is_file() else draw(p)


def _no_eval(files: _RunFiles) -> str:
    return _warnings(files, "eval/report.json") + na(
        f"eval/report.json: not available yet (run `nnforge evaluate {files.path}`).")


def _scalars(report: dict) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)]


def _metrics(files: _RunFiles) -> str:
    r = files.report
    if r is None:
        return _no_eval(files)
    if "per_class" not in r:  # another task's evaluation: its headline numbers
        return f'<p class="muted">On the <b>{esc(r.get("split", "test"))}</b> split.</p>' + _kv(_scalars(r))
    cards = [("accuracy", _pct(r["accuracy"]))]
    cards += [(f"top-{k} accuracy", _pct(v)) for k, v in r.get("top_k_accuracy", {}).items() if k != "1"]
    cards += [("macro F1", f"{r['macro_avg']['f1']:.4f}"), ("weighted F1", f"{r['weighted_avg']['f1']:.4f}"),
              ("ECE", f"{r['ece']:.4f}"), ("NLL", f"{r['nll']:.4f}")]
    out = [f'<p class="muted">On the <b>{esc(r.get("split", "test"))}</b> split, {r["n"]} examples, '
           f"{len(r['per_class'])} classes.</p>", _cards(cards), "<h3>Classification report</h3>"]
    rows = []
    for c, m in r["per_class"].items():
        bar = f'<span class="track"><span class="bar" style="width:{100 * m["f1"]:.0f}%"></span></span>'
        rows.append([esc(c), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", bar,
                     str(m["support"])])
    for name, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        a = r[key]
        rows.append([name, f"{a['precision']:.3f}", f"{a['recall']:.3f}", f"{a['f1']:.3f}", "",
                     str(a["support"])])
    out.append(_table(["class", "precision", "recall", "F1", "", "support"], rows))
    return "".join(out)


def _confusion(files: _RunFiles) -> str:
    r = files.report
    if r is None:
        return _no_eval(files)
    classes = list(r["per_class"])
    cm_png = _eval_png(files, "confusion_matrix.png",
                       lambda p: plots.plot_confusion_matrix(r["confusion_matrix"], classes, p))
    acc_png = _eval_png(files, "per_class_accuracy.png", lambda p: plots.plot_per_class_accuracy(
        r["per_class_accuracy"], p, overall=r["accuracy"]))
    out = [_picture(cm_png, "confusion matrix, counts and normalised by true class"),
           "<p class=\"muted\">Rows are the true class, columns the prediction.</p>",
           _picture(acc_png, "accuracy per class"), "<h3>Most confused pairs</h3>"]
    pairs = r.get("most_confused") or []
    if pairs:
        support = {c: m["support"] for c, m in r["per_class"].items()}
        rows = [[esc(p["true"]), esc(p["pred"]), str(p["count"]),
                 _pct(p["count"] / support[p["true"]]) if support.get(p["true"]) else "–"] for p in pairs]
        out.append(_table(["true class", "predicted as", "count", "share of true class"], rows, left=2))
    else:
        out.append('<p class="muted">No confusions: every example was classified correctly.</p>')
    return "".join(out)


def _calibration(files: _RunFiles) -> str:
    r = files.report
    if r is None:
        return _no_eval(files)
    png = _eval_png(files, "reliability.png", lambda p: plots.plot_reliability(r["reliability"], r["ece"], p))
    bins = [b for b in r["reliability"] if b["count"]]
    n = sum(b["count"] for b in bins)
    mean_conf = sum(b["confidence"] * b["count"] for b in bins) / n if n else float("nan")
    lean = "over-confident" if mean_conf > r["accuracy"] else "under-confident"
    text = (f"<p>Expected calibration error <b>{r['ece']:.4f}</b> ({len(r['reliability'])} equal-width "
            f"bins): the average gap between how sure the model is and how often it is right. Mean "
            f"confidence {mean_conf:.3f} against accuracy {r['accuracy']:.3f}: the model is {lean} overall. "
            f"Negative log-likelihood {r['nll']:.4f}.</p>")
    return f'<div class="cols"><div>{_picture(png, "reliability diagram")}</div><div>{text}</div></div>'


def _mistakes(files: _RunFiles) -> str:
    m = files.mistakes
    if m is None:
        return _warnings(files, "eval/mistakes.json") + na(
            f"eval/mistakes.json: not available yet (run `nnforge evaluate {files.path}`).")
    entries = m["entries"]
    head = (f'<p class="muted">The {len(entries)} misclassified examples with the highest loss, of '
            f'{m["n_wrong"]} mistakes on the {esc(m.get("split", "test"))} split, worst first.</p>')
    return head + _html.gallery(entries, m.get("kind", "image"))


BUILDERS: dict[str, tuple[Callable[[_RunFiles], str], str]] = {
    "summary": (_summary, "meta.json, config.yaml, metrics.csv"),
    "data": (_data, "data_report.json"),
    "curves": (_curves, "metrics.csv"),
    "metrics": (_metrics, "eval/report.json"),
    "confusion": (_confusion, "eval/report.json"),
    "calibration": (_calibration, "eval/report.json"),
    "mistakes": (_mistakes, "eval/mistakes.json"),
}


def add_section(run_dir: Path, sid: str, title: str, html: str) -> None:
    """Keep a task's own section (self-contained HTML) in RUN/eval/, listed in eval/sections.json, so every later
    report.html includes it; a section with the same id is replaced."""
    folder = Path(run_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "sections.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else []
    index = [s for s in index if s.get("id") != sid] + [{"id": sid, "title": title, "file": f"section_{sid}.html"}]
    (folder / f"section_{sid}.html").write_text(html, encoding="utf-8")
    index_path.write_text(json.dumps(index, indent=2))


def _task_section(files: _RunFiles, entry: dict) -> str:
    p = files.eval_dir / str(entry.get("file", ""))
    if p.parent != files.eval_dir or not p.is_file():
        return na(f"{entry.get('file')}: missing from eval/")
    return p.read_text(encoding="utf-8")


def _sections(files: _RunFiles) -> list[tuple[str, str, Callable[[_RunFiles], str], str]]:
    """(id, title, builder, sources) of the sections this run gets."""
    skip = set() if files.classifier else {"confusion", "calibration", "mistakes"}
    if files.data is None and not files.classifier:
        skip.add("data")  # a task that keeps no data report (an environment, generated data)
    own = {e["id"]: e for e in files.sections or [] if isinstance(e, dict) and e.get("id")}

    def task(e: dict):
        return (f"task-{e['id']}", str(e.get("title", e["id"])), lambda f: _task_section(f, e), f"eval/{e.get('file')}")

    # a task section with a generic section's id (an RL run's "curves" over environment steps) takes its place
    out = [task(own.pop(sid)) if sid in own else (sid, title, *BUILDERS[sid]) for sid, title in SECTIONS
           if sid not in skip or sid in own]
    return out + [task(e) for e in own.values()]


def write_report(run_dir: Path) -> Path:
    """Build run_dir/report.html from whatever the run folder holds; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a folder; expected a run folder (runs/<task>/<name>)")
    files = _read_run(run_dir)
    body = []
    sections = _sections(files)
    for sid, title, build, sources in sections:
        try:
            inner = build(files)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            # a field missing or of the wrong type in a file another version wrote: say so, keep the page
            inner = f'<p class="warn">This section could not be built from {esc(sources)}: ' \
                    f"{esc(type(e).__name__)}: {esc(e)}</p>"
        body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{inner}</section>')
    meta = files.meta or {}
    sub = " · ".join(str(x) for x in (meta.get("task"), meta.get("model"), meta.get("input", meta.get("kind")))
                     if x)
    now = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _, _ in sections)
    header = (f'<div class="wrap"><h1>Run report: {esc(run_dir.name)}</h1>'
              f'<div class="sub">{esc(sub or str(run_dir))} · written {esc(now)}</div><nav>{nav}</nav></div>')
    html = _html.page(f"nnforge report: {run_dir.name}", "\n".join(body), header=header)
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)  # a browser refreshing mid-write sees the old page or the new one, never half
    return out
