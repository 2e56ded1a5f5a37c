"""Prometheus metrics in the text exposition format, written by hand (prometheus_client is not a dependency).

    requests = Counter("nnforge_requests_total", "HTTP requests.", ["path", "code"])
    requests.inc(path="/v1/predict", code="200")
    print(Registry([requests]).render())

Every update happens on the server's event-loop thread, so the metrics need no lock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels {sorted(labels)} given, {list(self.label_names)} expected")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """A value read when scraped (queue depth, model info), from a function returning {label values: value}."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], dict[tuple[str, ...], float]],
                 labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self.read = read

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.read().items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self.bounds = sorted(float(b) for b in buckets)
        self.series: dict[tuple[str, ...], list] = {}  # key -> [per-bucket counts (+Inf last), sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        s = self.series.setdefault(key, [[0] * (len(self.bounds) + 1), 0.0, 0])
        s[0][bisect.bisect_left(self.bounds, value)] += 1  # le is inclusive: value == bound goes in that bucket
        s[1] += value
        s[2] += 1

    def lines(self) -> list[str]:
        out = []
        for key, (counts, total, n) in sorted(self.series.items()):
            cum = 0
            for bound, c in zip([*self.bounds, math.inf], counts, strict=True):
                cum += c
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cum}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return out


class Registry:
    def __init__(self, metrics: Iterable[_Metric] = ()):
        self.metrics = list(metrics)

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines = []
        for m in self.metrics:
            lines += m.header() + m.lines()
        return "\n".join(lines) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
