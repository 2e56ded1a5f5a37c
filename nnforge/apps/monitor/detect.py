"""Surges, shifts and drifts in one topic's windows: pure functions of the window statistics.

    python -c "from nnforge.apps.monitor.detect import *; print(surge(Window(0, 40, 30, -8.0, 9.0), [Window(0, 20, 2, 1.0, 5.0)] * 12, Rules()))"

A window holds count, negative (items scored negative), the sum of scores and of their squares. Against the trailing
baseline (the `baseline` windows before it, empty ones included):
  surge   the number of negative items: z = (x - mean) / max(std, sqrt(mean), 1), at least min_count of them; the
          floor is the spread counts have by chance (Poisson), so a quiet baseline does not turn 3 items into z 30
  shift   the share of negative items, as a binomial test against the baseline's share: z = (p - p0) /
          sqrt(p0 (1 - p0) / n), with n >= min_count items (two headlines are not a trend)
  drift   CUSUM of the window's mean score, standardised against the baseline (z_w = (mean - mu0) / (sd / sqrt n)):
          S = max(0, S - z_w - k); an alert when S >= h, then S starts again. It adds up small falls that no single
          window shows, so it catches a slow slide the z-scores miss
No topic is judged before it has min_baseline windows of history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Window:
    start: float
    count: int = 0
    negative: int = 0
    sum_score: float = 0.0
    sum_sq: float = 0.0

    @property
    def mean(self) -> float:
        return self.sum_score / self.count if self.count else 0.0


@dataclass
class Rules:
    z: float = 3.0  # z-score that makes a surge or a shift
    min_count: int = 5  # negative items for a surge; items in the window for a shift or a drift step
    baseline: int = 24  # trailing windows the current one is compared with
    min_baseline: int = 6  # windows of history before a topic is judged at all
    cusum_k: float = 0.5  # slack per window, in standard errors: smaller falls are noise
    cusum_h: float = 5.0  # accumulated standard errors that make a drift alert
    min_sd: float = 0.05  # floor of the item-level score spread (a baseline of identical scores)


@dataclass
class Finding:
    kind: str  # surge | shift | drift
    z: float
    message: str
    baseline: dict


def _baseline_stats(hist: list[Window]) -> dict:
    n = len(hist)
    negs = [w.negative for w in hist]
    mean_neg = sum(negs) / n
    sd_neg = math.sqrt(sum((x - mean_neg) ** 2 for x in negs) / max(1, n - 1))
    items = sum(w.count for w in hist)
    share = sum(negs) / items if items else 0.0
    mu = sum(w.sum_score for w in hist) / items if items else 0.0
    var = (sum(w.sum_sq for w in hist) / items - mu * mu) if items else 0.0
    return {"windows": n, "items": items, "mean_negative": mean_neg, "sd_negative": sd_neg, "share_negative": share,
            "mean_score": mu, "sd_score": math.sqrt(max(var, 0.0))}


def surge(w: Window, hist: list[Window], rules: Rules) -> Finding | None:
    if len(hist) < rules.min_baseline or w.negative < rules.min_count:
        return None
    b = _baseline_stats(hist)
    spread = max(b["sd_negative"], math.sqrt(b["mean_negative"]), 1.0)
    z = (w.negative - b["mean_negative"]) / spread
    if z < rules.z:
        return None
    return Finding("surge", z, f"{w.negative} negative items (baseline {b['mean_negative']:.1f} ± "
                               f"{b['sd_negative']:.1f} per window, z {z:.1f})", b)


def shift(w: Window, hist: list[Window], rules: Rules) -> Finding | None:
    if len(hist) < rules.min_baseline or w.count < rules.min_count:
        return None
    b = _baseline_stats(hist)
    if not b["items"]:
        return None
    p0 = min(max(b["share_negative"], 0.02), 0.98)  # a baseline with no negative item at all is not certainty
    p = w.negative / w.count
    z = (p - p0) / math.sqrt(p0 * (1 - p0) / w.count)
    if z < rules.z:
        return None
    return Finding("shift", z, f"{p:.0%} of {w.count} items negative (baseline {b['share_negative']:.0%}, z {z:.1f})",
                   b)


def drift(w: Window, hist: list[Window], rules: Rules, s: float) -> tuple[float, Finding | None]:
    """The CUSUM after this window, and a finding when it crossed h (S restarts from 0 after one)."""
    if len(hist) < rules.min_baseline or w.count < rules.min_count:
        return s, None
    b = _baseline_stats(hist)
    if not b["items"]:
        return s, None
    se = max(b["sd_score"], rules.min_sd) / math.sqrt(w.count)
    z_w = (w.mean - b["mean_score"]) / se
    s = max(0.0, s - z_w - rules.cusum_k)
    if s < rules.cusum_h:
        return s, None
    return 0.0, Finding("drift", s, f"mean sentiment {w.mean:+.2f} continues a slide (CUSUM {s:.1f} >= "
                                    f"{rules.cusum_h:g}; baseline {b['mean_score']:+.2f})", b)


def judge(w: Window, hist: list[Window], rules: Rules, cusum: float) -> tuple[float, list[Finding]]:
    """Every finding for window `w` against `hist` (the windows before it, oldest first), and the new CUSUM."""
    hist = hist[-rules.baseline:]
    found = [f for f in (surge(w, hist, rules), shift(w, hist, rules)) if f is not None]
    cusum, slide = drift(w, hist, rules, cusum)
    if slide is not None and not found:  # a window that already surged says it louder
        found.append(slide)
    return cusum, found
