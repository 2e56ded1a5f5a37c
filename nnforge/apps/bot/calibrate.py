"""The out-of-scope threshold: below it, the intent classifier's top probability is not trusted.

    t = calibrate(in_scope_conf, out_of_scope_conf)   # confidences of held-out intent examples / of OOS messages
    t["threshold"], t["false_accept"], t["false_reject"]

With out-of-scope examples the threshold maximises Youden's J, (1 - false accept rate) + (1 - false reject rate),
halfway between the two confidences it falls between (the gap is where no example tells us anything). Without
them it rejects at most TARGET_FALSE_REJECT of the held-out intent examples. The same function calibrates every
model the benchmark compares, so the comparison is of the models, not of the thresholds.
"""

from __future__ import annotations

import numpy as np

TARGET_FALSE_REJECT = 0.05  # without out-of-scope examples: turn away at most 1 in 20 in-scope messages


def rates(threshold: float, in_scope: np.ndarray, out_of_scope: np.ndarray) -> tuple[float, float]:
    """(false accept rate: out-of-scope messages at or above the threshold, false reject rate: in-scope below)."""
    fa = float(np.mean(out_of_scope >= threshold)) if len(out_of_scope) else 0.0
    fr = float(np.mean(in_scope < threshold)) if len(in_scope) else 0.0
    return fa, fr


def calibrate(in_scope, out_of_scope) -> dict:
    ins = np.asarray(in_scope, dtype=np.float64)
    oos = np.asarray(out_of_scope, dtype=np.float64)
    if not len(ins):
        raise ValueError("calibrating the out-of-scope threshold needs held-out in-scope examples")
    if len(oos):
        values = np.unique(np.concatenate([ins, oos, [0.0, 1.0]]))
        candidates = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2])
        best = max(candidates, key=lambda t: (1 - sum(rates(t, ins, oos)), -abs(t - 0.5)))
        method = "youden"
    else:
        best = float(np.quantile(ins, TARGET_FALSE_REJECT))
        method = f"quantile {TARGET_FALSE_REJECT:g} of the held-out confidences"
    fa, fr = rates(best, ins, oos)
    return {"threshold": float(best), "method": method, "false_accept": fa, "false_reject": fr,
            "n_in_scope": int(len(ins)), "n_out_of_scope": int(len(oos))}


def f1_out_of_scope(is_oos: np.ndarray, flagged: np.ndarray) -> dict:
    """Precision, recall and F1 of out-of-scope detection (the positive class: 'no intent applies')."""
    is_oos, flagged = np.asarray(is_oos, bool), np.asarray(flagged, bool)
    tp = int(np.sum(is_oos & flagged))
    p = tp / max(1, int(flagged.sum()))
    r = tp / max(1, int(is_oos.sum()))
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
