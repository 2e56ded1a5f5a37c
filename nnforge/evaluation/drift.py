"""Drift: how far a served model's answers have moved from the answers it gave on its evaluated split.

    ref = reference(probs, classes, split="test")    # write_evaluation saves it as RUN/eval/reference.json
    psi(ref["confidence"], served_counts)            # Population Stability Index of two histograms
    reading(0.18)                                    # "moderate"

Two signals, both from the model's own outputs (no labels needed): the distribution of the top probability in 10
equal bins over [0, 1] ("confidence"), and of the predicted class ("class"). The server (deploy/drift.py) keeps the
same two histograms over its last answers and compares them with the reference.

PSI = sum_i (a_i - e_i) * ln(a_i / e_i) over the bins, a and e the served and reference shares; a share of 0 is
taken as PSI_EPS, so an empty bin costs a large but finite amount instead of an infinite one. The usual reading:
under 0.1 stable, 0.1 to 0.25 moderate, over 0.25 significant.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CONFIDENCE_BINS = 10  # equal bins of the top probability over [0, 1]
PSI_EPS = 1e-4        # the share an empty bin counts as: ln(1e-4) bounds its term near 9 x the other share
READINGS = ((0.1, "stable"), (0.25, "moderate"), (math.inf, "significant"))
REFERENCE_FILE = "reference.json"  # under RUN/eval/


def confidence_bins(top: np.ndarray) -> np.ndarray:
    """(N,) top probabilities -> (N,) bin indices 0..9; a probability of exactly 1 falls in the last bin."""
    return np.minimum((np.asarray(top, dtype=np.float64) * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1)


def reference(probs: np.ndarray, classes: Sequence[str], split: str) -> dict:
    """The histograms a served model is compared with: counts of top-probability bins and of predicted classes."""
    p = np.asarray(probs, dtype=np.float64)  # (N, K) softmax
    pred = p.argmax(1)
    return {"split": split, "n": int(len(p)), "bins": CONFIDENCE_BINS,
            "confidence": np.bincount(confidence_bins(p.max(1)), minlength=CONFIDENCE_BINS).tolist(),
            "classes": [str(c) for c in classes],
            "predicted": np.bincount(pred, minlength=len(classes)).tolist()}


def read_reference(run: str | Path) -> dict | None:
    """RUN/eval/reference.json, checked; None when the run has none (evaluated before it was written)."""
    path = Path(run) / "eval" / REFERENCE_FILE
    try:
        ref = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    conf, pred, classes = ref.get("confidence"), ref.get("predicted"), ref.get("classes")
    if (not isinstance(conf, list) or len(conf) != CONFIDENCE_BINS or not isinstance(classes, list)
            or not isinstance(pred, list) or len(pred) != len(classes)
            or not all(isinstance(c, int) and c >= 0 for c in conf + pred) or sum(conf) == 0):
        raise ValueError(f"{path}: expected {CONFIDENCE_BINS} confidence counts and one count per class; "
                         "re-run `nnforge evaluate`")
    return ref


def psi(expected: Sequence[float], actual: Sequence[float], eps: float = PSI_EPS) -> float:
    """Population Stability Index of two histograms over the same bins (counts or shares; each is normalised)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.sum() <= 0 or a.sum() <= 0:
        raise ValueError(f"psi: expected two non-empty histograms of the same length, got {e.shape} and {a.shape}")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def reading(value: float) -> str:
    """The usual reading of a PSI: stable (< 0.1), moderate (0.1 to 0.25), significant (> 0.25)."""
    if math.isnan(value):
        return "unknown"
    return next(name for bound, name in READINGS if value < bound)
