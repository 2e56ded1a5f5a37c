"""The evaluation pictures, each written as one PNG.

    plot_confusion_matrix(m["confusion_matrix"], classes, "eval/confusion_matrix.png")
    plot_training_curves("runs/image/exp1/metrics.csv", "eval/training_curves.png")

Figures are built with matplotlib's object API on the Agg canvas and never touch pyplot: no GUI backend is
needed, nothing global is switched (a notebook that imports nnforge keeps its own backend), nothing has to be
closed, and the server can draw from several threads at once.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 130
LABEL_MAX = 20  # characters of a class name shown on an axis; tables in the report show the full name
SIDE_BY_SIDE_MAX = 12  # classes; above this the two confusion panels stack so each gets the full width
TXT = {"parse_math": False}  # class names like "$5 bill" must not turn into mathtext


def _short(name: str) -> str:
    return name if len(name) <= LABEL_MAX else name[: LABEL_MAX - 1] + "\u2026"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _draw(job: tuple[Callable, tuple, dict]) -> Path:
    fn, args, kwargs = job
    return fn(*args, **kwargs)


def draw_all(jobs: list[tuple[Callable, tuple, dict]]) -> list[Path]:
    """Draw independent pictures, the first on a forked process while this one draws the rest (Linux).

    matplotlib spends most of a picture laying out text in Python, so pictures do not overlap on threads; on two
    cores a second process nearly halves the second or so an evaluation's pictures take. Elsewhere (no cheap fork)
    and for a single picture, one after another here.
    """
    if len(jobs) < 2 or not sys.platform.startswith("linux"):
        return [_draw(j) for j in jobs]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        first = pool.submit(_draw, jobs[0])
        rest = [_draw(j) for j in jobs[1:]]
        return [first.result(), *rest]


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path) -> Path:
    """Counts and row-normalised matrices, rows = true class; side by side up to 12 classes, stacked above."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix: expected shape ({k}, {k}) for {k} classes, got {cm.shape}")
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    labels = [_short(c) for c in classes]
    stacked = k > SIDE_BY_SIDE_MAX
    panel = min(11.0, max(4.2, 0.34 * k + 2.2))  # inches per matrix side, labels included
    fig = Figure(figsize=(panel + 1.0, 2 * panel + 0.6) if stacked else (2 * panel + 1.6, panel),
                 layout="constrained")
    axes = fig.subplots(2, 1) if stacked else fig.subplots(1, 2)
    # stacked panels are twice as wide per class, so they take larger text
    tick_fs = 10 if k <= 12 else (9 if k <= 30 else 7)
    cell_fs = 10 if k <= 8 else (8 if k <= 20 else (6.5 if k <= 32 else 0))
    panels = ((axes[0], cm, "Counts", "d"), (axes[1], norm, "Share of each true class", ".2f"))
    for ax, mat, title, fmt in panels:
        vmax = 1.0 if fmt != "d" else max(1, int(mat.max()))
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=11)
        tilt = k * max(map(len, labels)) > 24  # labels that would run into each other lie at an angle
        ax.set_xticks(range(k), labels=labels, rotation=50 if tilt else 0, ha="right" if tilt else "center",
                      rotation_mode="anchor", fontsize=tick_fs, **TXT)
        ax.set_yticks(range(k), labels=labels, fontsize=tick_fs, **TXT)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if cell_fs:
            for i in range(k):
                for j in range(k):
                    v = mat[i, j]
                    if v == 0:  # empty cells stay blank so the confusions stand out
                        continue
                    dark = v > 0.55 * vmax
                    ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=cell_fs,
                            color="white" if dark else "#1f2328")
        fig.colorbar(im, ax=ax, shrink=0.75, aspect=25)
    return _save(fig, path)


def plot_per_class_accuracy(per_class: dict[str, float], path: str | Path,
                            overall: float | None = None) -> Path:
    """Horizontal bars of accuracy (recall) per class, in class order, with the overall accuracy as a line."""
    names = list(per_class)
    acc = np.array([per_class[c] for c in names], dtype=np.float64)
    k = len(names)
    fig = Figure(figsize=(8.5, max(2.4, 0.3 * k + 1.1)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(k)
    colors = ["#cf222e" if a < 0.5 else "#d4a017" if a < 0.8 else "#1a7f37" for a in acc]  # red/amber/green
    ax.barh(y, acc, color=colors, height=0.7)
    for yi, a in zip(y, acc, strict=True):
        ax.text(min(a, 1.0) + 0.01, yi, f"{a:.2f}", va="center", fontsize=8)
    if overall is not None:
        ax.axvline(overall, color="#1f2328", ls="--", lw=1, label=f"overall {overall:.3f}")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_yticks(y, labels=[_short(c) for c in names], fontsize=9 if k <= 20 else 8, **TXT)
    ax.set_ylim(k - 0.5, -0.5)  # first class on top, as in the tables
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("accuracy (recall) on the class")
    ax.set_title("Per-class accuracy", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_reliability(bins: list[dict], ece: float, path: str | Path) -> Path:
    """Accuracy per confidence bin against the diagonal (perfect calibration); counts per bin underneath."""
    fig = Figure(figsize=(6.2, 6.4), layout="constrained")
    ax, axc = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    full = [b for b in bins if b["count"]]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 1 / 15
    centre = np.array([(b["lo"] + b["hi"]) / 2 for b in full])
    acc = np.array([b["accuracy"] for b in full], dtype=np.float64)
    conf = np.array([b["confidence"] for b in full], dtype=np.float64)
    ax.plot([0, 1], [0, 1], ls="--", color="#59636e", lw=1, label="perfect calibration")
    ax.bar(centre, acc, width=width, color="#0969da", edgecolor="#0550ae", alpha=0.85, label="accuracy")
    ax.bar(centre, conf - acc, bottom=acc, width=width, color="none", edgecolor="#cf222e", hatch="//",
           lw=0.8, label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE = {ece:.4f})", fontsize=11)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    axc.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["count"] for b in bins], width=width, color="#8c959f")
    axc.set_xlabel("confidence (max probability)")
    axc.set_ylabel("examples")
    axc.grid(alpha=0.3)
    return _save(fig, path)


def read_metrics_csv(path: str | Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats; blank or non-numeric cells become NaN."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty, expected a header row (epoch, train_loss, ...)")
        cols: dict[str, list[float]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in cols:
                try:
                    cols[name].append(float(row.get(name) or "nan"))
                except ValueError:
                    cols[name].append(math.nan)
    return cols


TITLES = {"loss": "Loss", "acc": "Accuracy"}
NOT_CURVES = {"epoch", "step", "epoch_time_s", "elapsed_s", "examples_per_s"}


def curve_panels(columns: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Panels of metrics.csv: one per metric with its train_ and val_ columns side by side (loss first), then any
    other metric, then the learning rate(s)."""
    panels: dict[str, list[tuple[str, str]]] = {}
    lrs = []
    for col in columns:
        if col in NOT_CURVES:
            continue
        if col == "lr" or col.startswith("lr_"):
            lrs.append((col, col))
            continue
        split, _, base = col.partition("_")
        if split in ("train", "val") and base:
            panels.setdefault(base, []).append((col, split))
        else:
            panels.setdefault(col, []).append((col, col))
    order = sorted(panels, key=lambda b: (b != "loss", b != "acc"))  # stable: otherwise as logged
    out = [(TITLES.get(b, b), panels[b]) for b in order]
    return out + ([("Learning rate (end of epoch)", lrs)] if lrs else [])


def plot_training_curves(metrics_csv: str | Path, path: str | Path, best_epoch: int | None = None) -> Path:
    """Every logged metric against epoch (train and val side by side), then the learning rate."""
    cols = read_metrics_csv(metrics_csv)
    n = len(next(iter(cols.values()), []))
    if n == 0:
        raise ValueError(f"{metrics_csv}: no rows yet; nothing to plot")
    epoch = np.array(cols.get("epoch", range(1, n + 1)), dtype=np.float64)
    if np.isnan(epoch).any():
        epoch = np.arange(1, n + 1, dtype=np.float64)
    panels = curve_panels(list(cols))
    if not panels:
        raise ValueError(f"{metrics_csv}: no metric columns to plot")
    fig = Figure(figsize=(4.3 * len(panels), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    marker = "o" if n <= 40 else None
    for ax, (title, series) in zip(axes, panels, strict=True):
        drawn = 0
        for col, label in series:
            v = np.array(cols.get(col, []), dtype=np.float64)
            if v.size and not np.isnan(v).all():
                ax.plot(epoch, v, marker=marker, ms=4, lw=1.6, label=label)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes,
                    color="#59636e")
        elif len(series) > 1:
            ax.legend(fontsize=9)
        if best_epoch is not None and drawn:
            ax.axvline(best_epoch, color="#1a7f37", ls=":", lw=1.2)
        if title.startswith("Learning") and drawn:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if n == 1:  # a single point: give it some room instead of a zero-width axis
            ax.set_xlim(epoch[0] - 1, epoch[0] + 1)
    return _save(fig, path)
