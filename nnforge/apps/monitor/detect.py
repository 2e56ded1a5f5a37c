"""Surges, shifts and drifts in one topic's windows: pure functions of the window statistics.

    python -c "from nnforge.apps.monitor.detect import *; print(judge(Window(0, 40, 30, -8, 9), [Window(0, 20, 2,
    1, 5)] * 12, Rules(), 0))"       # (cusum, [surge z 19.8, shift z 9.6]): 30 negative where 2 are usual

A window holds count, negative (items scored negative), the sum of scores and of their squares. Against the trailing
baseline (the `baseline` windows before it, empty ones included):
  surge   the number of negative items: z = (x - mean) / max(std, sqrt(mean), 1) >= z, at least min_count of them,
          and as unlikely by chance as z says: the Poisson tail P(X >= x | mean) at most the normal tail of z. The
          floor and the exact tail keep a quiet topic (a mean of 1 a window) from alerting on 4 or 5 by chance
  shift   the share of negative items, an exact binomial test against the baseline's share: P(X >= negative |
          count, p0) at most the normal tail of z, with count >= min_count (two headlines are not a trend); the
          finding's z is the normal quantile of that tail
  drift   CUSUM of the window's mean score, standardised against the baseline (z_w = (mean - mu0) / (sd / sqrt n)):
          S = max(0, S - z_w - k); an alert when S >= h, then S starts again. It adds up small falls that no single
          window shows, so it catches a slow slide the z-scores miss. h = 8 with k = 0.5: an in-control topic
          crosses it by chance about once in several thousand windows
No topic is judged before it has min_baseline windows of history. The z of 3 means a tail of 0.00135 a window: with
a dozen topics and hourly windows, about one chance alert in three days, where the normal approximation with 5
items alone would give several a day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


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
    cusum_h: float = 8.0  # accumulated standard errors that make a drift alert
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


def tail(z: float) -> float:
    """P(Z >= z) of a standard normal: how unlikely a z-score is."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def poisson_tail(x: int, lam: float) -> float:
    """P(X >= x) for X ~ Poisson(lam)."""
    if x <= 0:
        return 1.0
    lam = max(lam, 1e-9)
    below = sum(math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in range(x))
    return max(0.0, 1.0 - below)


def binomial_tail(x: int, n: int, p: float) -> float:
    """P(X >= x) for X ~ Binomial(n, p), summed in log space (n may be thousands)."""
    if x <= 0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp + (n - k) * lq
             for k in range(x, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def surge(w: Window, hist: list[Window], rules: Rules) -> Finding | None:
    if len(hist) < rules.min_baseline or w.negative < rules.min_count:
        return None
    b = _baseline_stats(hist)
    spread = max(b["sd_negative"], math.sqrt(b["mean_negative"]), 1.0)
    z = (w.negative - b["mean_negative"]) / spread
    if z < rules.z or poisson_tail(w.negative, max(b["mean_negative"], 0.5)) > tail(rules.z):
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
    p = binomial_tail(w.negative, w.count, p0)
    if p > tail(rules.z):
        return None
    z = -NormalDist().inv_cdf(max(p, 1e-300))  # the z-score as unlikely as this share
    return Finding("shift", z, f"{w.negative / w.count:.0%} of {w.count} items negative (baseline "
                               f"{b['share_negative']:.0%}, z {z:.1f})", b)


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
