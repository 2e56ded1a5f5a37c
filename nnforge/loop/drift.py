"""A running server's drift scores, read from its /metrics, in words.

    nnforge registry show shoes@champion --server http://127.0.0.1:8000
    read_drift("http://127.0.0.1:8000")   # ["confidence: PSI 0.031 (stable) over the last 2000 answers", ...]

The server (deploy/drift.py) keeps each worker's last answers and publishes nnforge_drift_psi{signal=...} (with a
pid label per worker when there are several) and nnforge_drift_window; this reads them back with the usual PSI
reading: under 0.1 stable, 0.1 to 0.25 moderate, over 0.25 significant.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request

from nnforge.evaluation.drift import reading

SAMPLE = re.compile(r"^(nnforge_drift_psi|nnforge_drift_window)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_drift(text: str) -> dict[str, dict]:
    """Prometheus text -> {worker: {"window": n, "confidence": psi, "class": psi}}; worker "" for one process."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        worker = out.setdefault(labels.get("pid", ""), {})
        if m.group(1) == "nnforge_drift_window":
            worker["window"] = int(value) if math.isfinite(value) else 0
        elif "signal" in labels:
            worker[labels["signal"]] = value
    return out


def read_drift(url: str, token: str | None = None, timeout: float = 10.0) -> list[str]:
    """Human-readable lines: one per signal (and worker), or one line saying why there is no score."""
    request = urllib.request.Request(url.rstrip("/") + "/metrics",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        return [f"could not read {url}/metrics: {reason}"]
    workers = parse_drift(text)
    if not workers:
        return ["no drift scores: the served run has no eval/reference.json (run `nnforge evaluate` on it), or the "
                "server is not an nnforge classifier"]
    lines = []
    for pid, w in sorted(workers.items()):
        who = f" (worker {pid})" if pid else ""
        n = w.get("window", 0)
        scores = {s: v for s, v in w.items() if s != "window" and not math.isnan(v)}
        if not scores:
            lines.append(f"drift{who}: not enough answers yet ({n} in the window since the model loaded)")
        for signal, value in sorted(scores.items()):
            lines.append(f"{signal}{who}: PSI {value:.3f} ({reading(value)}) over the last {n} answers")
    return lines
