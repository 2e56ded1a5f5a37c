"""The server's drift window: one worker's last answers as histograms, scored against the served run's reference.

    window = DriftWindow()                              # one per worker process
    window.reset(read_reference(run), classes)          # at every load, reload and followed alias
    window.observe(probs)                               # (B, K) probabilities of each answered batch
    window.scores()    # {"window": 2000, "signals": {"confidence": {"psi": 0.04, "reading": "stable"}, ...}, ...}

The reference is RUN/eval/reference.json (written by `nnforge evaluate` and at the end of training; see
evaluation/drift.py for the statistic): the top-probability and predicted-class histograms of the evaluated split.
The window holds the last WINDOW answers (top-probability bin, predicted class) with running counts, so an answer
costs a deque append and two increments; PSI is computed when asked (the server publishes it every half second, and
/v1/model asks). Fewer than MIN_ANSWERS answers give no score: a PSI of a few dozen answers is mostly noise. After a
reload the window starts empty, since the answers of the model before say nothing about the new one.

The class signal needs the served model's classes to be the reference's (always so for a run's own reference) and
is left out past MAX_CLASS_SIGNAL classes, where a window of 2000 answers leaves most classes empty.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from nnforge.evaluation.drift import CONFIDENCE_BINS, confidence_bins, psi, reading

WINDOW = 2000        # answers per worker the served distribution is taken over
MIN_ANSWERS = 200    # answers needed before a score is given
MAX_CLASS_SIGNAL = 1000
SIGNALS = ("confidence", "class")


class DriftWindow:
    def __init__(self, size: int = WINDOW, min_answers: int = MIN_ANSWERS):
        self.size, self.min_answers = size, min_answers
        self.changes = 0  # answers observed and resets, ever: a publisher skips a window that has not moved
        self.reset(None, [])

    def reset(self, reference: dict | None, classes: list[str]) -> None:
        """Start an empty window for a newly served model; `reference` None: the run has no reference.json."""
        self.reference = reference
        self.class_signal = (reference is not None and reference["classes"] == list(classes)
                             and len(classes) <= MAX_CLASS_SIGNAL)
        self.answers: deque[tuple[int, int]] = deque()  # (confidence bin, predicted class), oldest first
        self.confidence = [0] * CONFIDENCE_BINS
        self.predicted = [0] * len(classes)
        self.changes += 1

    def observe(self, probs: np.ndarray) -> None:
        """Add a batch of answers: (B, K) probabilities."""
        if self.reference is None:
            return
        bins = confidence_bins(probs.max(1)).tolist()
        for b, c in zip(bins, probs.argmax(1).tolist(), strict=True):
            if len(self.answers) == self.size:
                ob, oc = self.answers.popleft()
                self.confidence[ob] -= 1
                self.predicted[oc] -= 1
            self.answers.append((b, c))
            self.confidence[b] += 1
            self.predicted[c] += 1
        self.changes += len(bins)

    def psi(self) -> dict[str, float]:
        """PSI per signal; empty until the window holds min_answers answers (or without a reference)."""
        if self.reference is None or len(self.answers) < self.min_answers:
            return {}
        out = {"confidence": psi(self.reference["confidence"], self.confidence)}
        if self.class_signal and sum(self.reference["predicted"]) > 0:
            out["class"] = psi(self.reference["predicted"], self.predicted)
        return out

    def scores(self) -> dict:
        """What /v1/model reports: the window, the reference it is compared with, PSI and its reading per signal."""
        ref = self.reference
        return {"window": len(self.answers), "window_size": self.size, "min_answers": self.min_answers,
                "reference": {"split": ref.get("split"), "n": ref.get("n")} if ref else None,
                "signals": {name: {"psi": round(value, 6), "reading": reading(value)}
                            for name, value in self.psi().items() if math.isfinite(value)}}
