"""Compare two evaluated runs: what changed overall and which classes got better or worse.

    d = compare_runs(Path("runs/image/exp1"), Path("runs/image/exp2"))
    print(format_comparison(d))

Differences are always b - a. For accuracy and F1 higher is better; for ECE and NLL lower is better.
"""

from __future__ import annotations

import json
from pathlib import Path

LOWER_IS_BETTER = ("ece", "nll")


def _read_report(run: Path) -> dict:
    p = Path(run) / "eval" / "report.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; run `nnforge evaluate {run}` first")
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); run `nnforge evaluate {run}` again") from None
    for key in ("accuracy", "per_class", "macro_avg", "weighted_avg", "ece", "nll"):
        if not isinstance(r, dict) or key not in r:
            raise ValueError(f"{p}: missing field '{key}'; run `nnforge evaluate {run}` again")
    return r


def _pair(a: float, b: float) -> dict:
    return {"a": a, "b": b, "diff": b - a}


def compare_runs(run_a: Path, run_b: Path, threshold: float = 0.01) -> dict:
    """Per-metric and per-class differences (b - a) between two runs' eval/report.json.

    Keys: run_a, run_b, threshold, metrics {name: {a, b, diff}}, per_class {class: {precision, recall, f1:
    {a, b, diff}, support: {a, b}}} over the shared classes, improved / worse (classes whose F1 moved by more
    than threshold, largest change first), same_classes, shared_classes, only_a, only_b, warnings.
    """
    ra, rb = _read_report(run_a), _read_report(run_b)
    metrics = {"accuracy": _pair(ra["accuracy"], rb["accuracy"])}
    ka, kb = ra.get("top_k_accuracy", {}), rb.get("top_k_accuracy", {})
    for k in sorted(set(ka) & set(kb), key=int):
        if k != "1":  # top-1 is accuracy
            metrics[f"top{k}_accuracy"] = _pair(ka[k], kb[k])
    for avg in ("macro_avg", "weighted_avg"):
        metrics[f"{avg.split('_')[0]}_f1"] = _pair(ra[avg]["f1"], rb[avg]["f1"])
    metrics["ece"] = _pair(ra["ece"], rb["ece"])
    metrics["nll"] = _pair(ra["nll"], rb["nll"])

    ca, cb = list(ra["per_class"]), list(rb["per_class"])
    shared = [c for c in ca if c in rb["per_class"]]
    per_class = {}
    for c in shared:
        a, b = ra["per_class"][c], rb["per_class"][c]
        per_class[c] = {m: _pair(a[m], b[m]) for m in ("precision", "recall", "f1")}
        per_class[c]["support"] = {"a": a["support"], "b": b["support"]}
    moved = sorted(shared, key=lambda c: -abs(per_class[c]["f1"]["diff"]))
    improved = [c for c in moved if per_class[c]["f1"]["diff"] > threshold]
    worse = [c for c in moved if per_class[c]["f1"]["diff"] < -threshold]

    warnings = []
    if ra.get("split") != rb.get("split"):
        warnings.append(f"different splits: a evaluated on {ra.get('split')!r}, b on {rb.get('split')!r}")
    if ra.get("n") != rb.get("n"):
        warnings.append(f"different example counts: a has {ra.get('n')}, b has {rb.get('n')}; "
                        "the runs were not evaluated on the same data")
    only_a = [c for c in ca if c not in rb["per_class"]]
    only_b = [c for c in cb if c not in ra["per_class"]]
    if only_a or only_b:
        warnings.append("the runs have different classes; per-class figures cover the shared ones, overall "
                        "metrics are not directly comparable")
    return {
        "run_a": str(run_a), "run_b": str(run_b), "threshold": threshold,
        "metrics": metrics, "per_class": per_class, "improved": improved, "worse": worse,
        "same_classes": not only_a and not only_b, "shared_classes": shared,
        "only_a": only_a, "only_b": only_b,
        "warnings": warnings,
    }


def _verdict(name: str, diff: float, threshold: float) -> str:
    if abs(diff) <= 1e-12:
        return "same"
    better = diff < 0 if name in LOWER_IS_BETTER else diff > 0
    mark = "better" if better else "worse"
    return mark if abs(diff) > threshold else f"{mark} (small)"


def format_comparison(d: dict) -> str:
    """The comparison as a plain-text table for the terminal."""
    lines = [f"a: {d['run_a']}", f"b: {d['run_b']}", ""]
    lines += [f"warning: {w}" for w in d["warnings"]]
    if d["warnings"]:
        lines.append("")
    lines.append(f"{'metric':<16}{'a':>10}{'b':>10}{'b - a':>10}  ")
    for name, m in d["metrics"].items():
        lines.append(f"{name:<16}{m['a']:>10.4f}{m['b']:>10.4f}{m['diff']:>+10.4f}  "
                     f"{_verdict(name, m['diff'], d['threshold'])}")
    width = max([len("class"), *(len(c) for c in d["per_class"])])
    lines += ["", f"per class (shared: {len(d['shared_classes'])}), b - a:",
              f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'f1 a':>6}  {'f1 b':>6}"]
    for c, m in d["per_class"].items():
        lines.append(f"{c:<{width}}  {m['precision']['diff']:>+9.4f}  {m['recall']['diff']:>+9.4f}  "
                     f"{m['f1']['diff']:>+9.4f}  {m['f1']['a']:>6.3f}  {m['f1']['b']:>6.3f}")
    t = d["threshold"]
    lines += ["", f"F1 improved by more than {t}: {', '.join(d['improved']) or 'none'}",
              f"F1 worse by more than {t}: {', '.join(d['worse']) or 'none'}"]
    if not d["same_classes"]:
        lines.append(f"only in a: {', '.join(d['only_a']) or 'none'}")
        lines.append(f"only in b: {', '.join(d['only_b']) or 'none'}")
    return "\n".join(lines) + "\n"
