"""Classification metrics from predicted probabilities, and the eval/ folder a run keeps them in.

    m = classification_metrics(y_true, probs, classes)          # y_true (N,) ints, probs (N, K) softmax
    print(format_classification_report(m))
    write_evaluation(run / "eval", y_true, probs, classes, items=paths, kind="image")

Everything returned is plain Python (float, int, str, list, dict, None), so it goes straight into JSON.
Conventions follow scikit-learn where it has one: a precision or recall with a zero denominator is 0, macro
averages weigh every class equally, weighted averages weigh by support.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnforge.evaluation import _html
from nnforge.evaluation.drift import REFERENCE_FILE
from nnforge.evaluation.drift import reference as drift_reference

ECE_BINS = 15
NLL_EPS = 1e-12  # a probability of exactly 0 for the true class would make the NLL infinite
CONFUSED_PAIRS = 10
KINDS = ("image", "text")


def _check_inputs(y_true, probs, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"probs: expected shape (N, {k}) for {k} classes, got {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true: expected shape ({p.shape[0]},) to match probs, got {y.shape}")
    if len(y) == 0:
        raise ValueError("y_true: no examples to evaluate")
    if k < 2:
        raise ValueError(f"classes: need at least 2, got {list(classes)}")
    if len(set(classes)) != k:
        dup = sorted({c for c in classes if list(classes).count(c) > 1})
        raise ValueError(f"classes: names must be unique, repeated: {dup}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"y_true: expected integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= k))
    if bad.size:
        raise ValueError(f"y_true[{bad[0]}] = {y[bad[0]]}: expected a class index in [0, {k})")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        row = int(np.flatnonzero(~np.all(np.isfinite(p) & (p >= 0), axis=1))[0])
        raise ValueError(f"probs row {row}: expected finite non-negative probabilities, "
                         f"got {p[row].tolist()}")
    sums = p.sum(1)
    off = np.flatnonzero(np.abs(sums - 1) > 1e-2)
    if off.size:
        raise ValueError(f"probs row {off[0]} sums to {sums[off[0]]:.4f}, expected 1: pass softmax "
                         "probabilities, not logits")
    return y, p / sums[:, None]  # renormalise away float rounding (bf16 softmax)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray,
                     n_bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """ECE and its bins. Bin b covers confidences in (b/n, (b+1)/n]; empty bins have None for their means."""
    idx = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (N,)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    bins, ece = [], 0.0
    for b in range(n_bins):
        n = int(count[b])
        mc = conf_sum[b] / n if n else None
        ma = acc_sum[b] / n if n else None
        if n:
            ece += n / len(confidence) * abs(ma - mc)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n,
                     "confidence": None if mc is None else float(mc),
                     "accuracy": None if ma is None else float(ma)})
    return float(ece), bins


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           top_k: Sequence[int] = (1, 3, 5)) -> dict:
    """All metrics of a classifier's predictions. y_true (N,) class indices, probs (N, K) rows summing to 1.

    Keys: n, classes, accuracy, top_k_accuracy {"k": acc} (only k < K), per_class {name: precision,
    recall, f1, support, accuracy}, macro_avg / weighted_avg {precision, recall, f1, support},
    confusion_matrix (K x K, rows = true), nll, ece, reliability (bins), most_confused [{true, pred, count}],
    per_class_accuracy.
    """
    y, p = _check_inputs(y_true, probs, classes)
    n, k = p.shape
    pred = p.argmax(1)  # (N,)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)  # true count per class
    predicted = cm.sum(0)
    precision = _safe_div(tp, predicted.astype(np.float64))
    recall = _safe_div(tp, support.astype(np.float64))
    f1 = _safe_div(2 * precision * recall, precision + recall)

    # rank of the true class: how many classes got a strictly higher probability
    true_p = p[np.arange(n), y]  # (N,)
    rank = (p > true_p[:, None]).sum(1)  # ties count in the model's favour
    topk = {str(kk): float(np.mean(rank < kk)) for kk in sorted(set(top_k)) if 0 < kk < k}

    confidence = p.max(1)
    ece, bins = reliability_bins(confidence, pred == y)

    off = [(int(cm[i, j]), i, j) for i in range(k) for j in range(k) if i != j and cm[i, j] > 0]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    confused = [{"true": classes[i], "pred": classes[j], "count": c} for c, i, j in off[:CONFUSED_PAIRS]]

    w = support / n
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(support[i]), "accuracy": float(recall[i])} for i, c in enumerate(classes)}
    return {
        "n": int(n),
        "classes": list(classes),
        "accuracy": float(np.mean(pred == y)),
        "top_k_accuracy": topk,
        "per_class": per_class,
        "macro_avg": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                      "f1": float(f1.mean()), "support": int(n)},
        "weighted_avg": {"precision": float(w @ precision), "recall": float(w @ recall),
                         "f1": float(w @ f1), "support": int(n)},
        "confusion_matrix": cm.tolist(),
        "nll": float(-np.mean(np.log(np.clip(true_p, NLL_EPS, None)))),
        "ece": ece,
        "reliability": bins,
        "most_confused": confused,
        # the diagonal of the row-normalised confusion matrix, i.e. recall: "of the true X, how many we got"
        "per_class_accuracy": {c: float(recall[i]) for i, c in enumerate(classes)},
    }


def format_classification_report(report: dict, digits: int = 2) -> str:
    """A text table in the layout of scikit-learn's classification_report (same columns and spacing)."""
    names = list(report["per_class"])
    width = max(len("weighted avg"), digits, *(len(c) for c in names))

    def row(name: str, r: dict) -> str:
        return (f"{name:>{width}}  {r['precision']:>9.{digits}f} {r['recall']:>9.{digits}f} "
                f"{r['f1']:>9.{digits}f} {r['support']:>9}")

    lines = [f"{'':>{width}}  {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
    lines += [row(c, report["per_class"][c]) for c in names]
    acc = report["accuracy"]
    lines += ["", f"{'accuracy':>{width}}  {'':>9} {'':>9} {acc:>9.{digits}f} {report['n']:>9}"]
    lines += [row("macro avg", report["macro_avg"]), row("weighted avg", report["weighted_avg"])]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_evaluation(out_dir: Path, y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                     items: list[str], kind: str, split: str = "test", worst_n: int = 24,
                     thumbnails: list[bytes | None] | None = None) -> dict:
    """Write a run's eval/ folder and return the metrics.

    items: one per example, file paths (kind "image") or the texts (kind "text").
    thumbnails: optional encoded image bytes per example (e.g. decoded from a tensor cache); where given they
    are used instead of reading items[i]. Files written: report.json, classification_report.txt,
    confusion_matrix.csv, predictions.csv, mistakes.json (the gallery's data, reused by report.html),
    misclassified.html, confusion_matrix.png, per_class_accuracy.png, reliability.png, and reference.json (the
    split's top-probability and predicted-class histograms, which a server's drift scores compare with: drift.py).
    """
    from nnforge.evaluation import plots  # matplotlib only when pictures are made

    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    y, p = _check_inputs(y_true, probs, classes)
    if len(items) != len(y):
        raise ValueError(f"items: expected {len(y)} entries (one per example), got {len(items)}")
    if thumbnails is not None and len(thumbnails) != len(y):
        raise ValueError(f"thumbnails: expected {len(y)} entries (one per example, None allowed), "
                         f"got {len(thumbnails)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = classification_metrics(y, p, classes)

    (out / "report.json").write_text(json.dumps({**m, "split": split}, indent=2))
    (out / "classification_report.txt").write_text(format_classification_report(m))
    # what a server of this run compares its answers with (drift on /metrics): confidence and predicted classes
    (out / REFERENCE_FILE).write_text(json.dumps(drift_reference(p, classes, split)))
    _write_csv(out / "confusion_matrix.csv", ["true\\pred", *classes],
               [[c, *row] for c, row in zip(classes, m["confusion_matrix"], strict=True)])

    pred = p.argmax(1)
    conf = p.max(1)
    loss = -np.log(np.clip(p[np.arange(len(y)), y], NLL_EPS, None))  # (N,) per-example cross-entropy
    _write_csv(out / "predictions.csv", ["index", "item", "true", "pred", "confidence", "loss"],
               [[i, items[i], classes[y[i]], classes[pred[i]], f"{conf[i]:.6f}", f"{loss[i]:.6f}"]
                for i in range(len(y))])

    wrong = np.flatnonzero(pred != y)
    worst = wrong[np.argsort(-loss[wrong], kind="stable")][:worst_n]  # highest loss first
    entries = []
    for i in worst:
        thumb = None
        if kind == "image":
            src = thumbnails[i] if thumbnails is not None and thumbnails[i] is not None else items[i]
            png = _html.thumbnail_png(src)
            thumb = None if png is None else _html.png_b64(png)
        entries.append({"index": int(i), "item": str(items[i]), "true": classes[y[i]],
                        "pred": classes[pred[i]], "confidence": float(conf[i]), "loss": float(loss[i]),
                        "thumbnail": thumb})
    (out / "mistakes.json").write_text(json.dumps({"kind": kind, "split": split, "n_wrong": int(len(wrong)),
                                                   "entries": entries}, indent=2))
    title = f"Worst {len(entries)} of {len(wrong)} mistakes ({split} split, {len(y)} examples)"
    body = f"<section><h2>{_html.esc(title)}</h2>{_html.gallery(entries, kind)}</section>"
    (out / "misclassified.html").write_text(_html.page("Misclassified examples", body), encoding="utf-8")

    plots.draw_all([(plots.plot_confusion_matrix, (m["confusion_matrix"], classes, out / "confusion_matrix.png"), {}),
                    (plots.plot_per_class_accuracy, (m["per_class_accuracy"], out / "per_class_accuracy.png"),
                     {"overall": m["accuracy"]}),
                    (plots.plot_reliability, (m["reliability"], m["ece"], out / "reliability.png"), {})])
    return m
