"""The monitor: score each item's sentiment, tag its topics, count it into its windows, judge closed windows, alert.

    m = Monitor("runs/text/sentiment", state="runs/monitor/news/state.db", topics="topics.yaml", window_s=3600)
    m.process(items)      # a batch of Item, any order; returns the alerts it raised
    m.flush()             # the end of a finite stream: judge the last, unfinished window too
    m.close()

Sentiment comes from any nnforge text classifier with a positive and a negative class: an item's score is
P(positive) - P(negative) in [-1, 1], and it counts as negative when the negative class is the most probable.

Time is the items' own (event time): a window [start, start + window) is judged once an item at or after its end
plus `lateness` has been seen (or, with clock="wall", once the wall clock is past it). An item for a window already
judged is late: counted as such, not added. An item seen before (same id) is a duplicate: not added.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from nnforge import api
from nnforge.apps.monitor.alerts import Sinks
from nnforge.apps.monitor.detect import Rules, Window, judge
from nnforge.apps.monitor.state import State
from nnforge.apps.monitor.streams import Item, iso
from nnforge.apps.monitor.topics import DEFAULT_SIMILARITY, Tagger, read_topics

MAX_FUTURE_S = 86400.0  # an item more than a day ahead of this machine's clock is a mistake in the feed
POSITIVE, NEGATIVE = ("positive", "pos", "bullish", "good"), ("negative", "neg", "bearish", "bad")
HEADLINES = 10  # headlines kept with an alert: the most negative of its window


def sentiment_classes(classes: list[str], positive: str | None, negative: str | None) -> tuple[int, int]:
    lower = [c.lower() for c in classes]

    def find(given, names, flag):
        if given is not None:
            if given not in classes:
                raise ValueError(f"{flag} {given!r} is not a class of the model; its classes: {classes}")
            return classes.index(given)
        hit = next((lower.index(n) for n in names if n in lower), None)
        if hit is None:
            raise ValueError(f"the model's classes {classes} have no {names[0]} class; name it with {flag}")
        return hit

    return find(positive, POSITIVE, "--positive"), find(negative, NEGATIVE, "--negative")


class Monitor:
    def __init__(self, model: str | Path, state: str | Path, topics: str | Path | None = None,
                 window_s: float = 3600.0, rules: Rules | None = None, sinks: Sinks | None = None,
                 lateness_s: float = 0.0, clock: str = "event", topic_model: str | Path | None = None,
                 positive: str | None = None, negative: str | None = None, device: str = "cpu",
                 keywords_only: bool = False):
        if window_s <= 0:
            raise ValueError(f"--window must be positive, got {window_s:g} s")
        if clock not in ("event", "wall"):
            raise ValueError(f"--clock {clock!r}: expected event or wall")
        self.loaded = api.load(model, device=device)
        self.pos, self.neg = sentiment_classes(self.loaded.classes, positive, negative)
        topic_list, similarity = read_topics(topics) if topics else ([], DEFAULT_SIMILARITY)
        described = any(t.description for t in topic_list) and not keywords_only
        embedder = api.load(topic_model, device=device) if topic_model and described else self.loaded
        self.tagger = Tagger(topic_list, similarity, embedder.embed if described else None)
        fingerprint = hashlib.sha256(Path(topics).read_bytes()).hexdigest()[:16] if topics else "none"
        tagging = f"keywords+{Path(topic_model or model).resolve()}" if described else "keywords"
        self.state = State(state, window_s, config={"model": Path(model).resolve(), "topics": fingerprint,
                                                    "tagging": tagging})
        self.window_s, self.lateness_s, self.clock = float(window_s), float(lateness_s), clock
        self.rules = rules or Rules()
        self.sinks = sinks or Sinks()
        self.seen = self.added = self.duplicates = self.late = self.future = 0
        self.t0 = time.perf_counter()
        self.deliver()  # alerts a previous run committed but did not get to send

    # ------------------------------------------------------------------------------------------------------------
    def score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(score in [-1, 1], negative or not) of each text."""
        p = self.loaded.predict_proba(texts)  # (N, K)
        return p[:, self.pos] - p[:, self.neg], p.argmax(1) == self.neg

    def process(self, items: list[Item]) -> list[dict]:
        if not items:
            return []
        self.seen += len(items)
        st = self.state
        known, judged = st.known([it.id for it in items]), st.judged_until
        horizon = time.time() + MAX_FUTURE_S
        fresh, ids, dup, late, future = [], set(), 0, 0, 0
        for it in items:
            if it.id in known or it.id in ids:
                dup += 1
            elif judged is not None and it.time < judged:
                late += 1
            elif it.time > horizon:
                future += 1
            else:
                ids.add(it.id)
                fresh.append(it)
        rows = []
        if fresh:
            texts = [it.text for it in fresh]
            scores, negative = self.score(texts)
            rows = [(it.id, it.time, it.text, float(s), int(n), tags)
                    for it, s, n, tags in zip(fresh, scores, negative, self.tagger.tag(texts), strict=True)]
        with st.batch():  # items, windows, judgements and counters: all of it or none of it
            if rows:
                st.add(rows)
                mark = max(st.watermark or -np.inf, max(r[1] for r in rows))
                st.set_meta("watermark", repr(mark))
            for key, n in (("items", len(rows)), ("duplicates", dup), ("late", late), ("future", future)):
                st.count(key, n)
            self._judge_closed()
            st.prune()
        self.added += len(rows)
        self.duplicates, self.late, self.future = self.duplicates + dup, self.late + late, self.future + future
        return self.deliver()

    def tick(self) -> list[dict]:
        """With clock="wall": judge the windows the wall clock has closed, even when no item comes."""
        if self.clock != "wall":
            return []
        with self.state.batch():
            self._judge_closed()
        return self.deliver()

    def flush(self) -> list[dict]:
        """The stream ended: judge every window up to and including the last one that has items."""
        mark = self.state.watermark
        if mark is None:
            return []
        with self.state.batch():
            self._judge(self.state.window_of(mark) + self.window_s)
        return self.deliver()

    # ------------------------------------------------------------------------------------------------------------
    def _judge_closed(self) -> None:
        mark = self.state.watermark
        if self.clock == "wall":
            mark = max(mark or -np.inf, time.time())
        if mark is not None and np.isfinite(mark):
            self._judge(self.state.window_of(mark - self.lateness_s))

    def _judge(self, until: float) -> None:
        """Judge every topic's windows that start before `until` and were not judged yet."""
        st, ws, rules = self.state, self.window_s, self.rules
        detectors = st.detectors()
        if not detectors:
            return
        judged = st.judged_until
        if judged is None:
            judged = min(first for first, _ in detectors.values())
        if until <= judged:
            return
        for topic, (first, cusum) in detectors.items():
            span = rules.baseline * ws
            have = st.windows(topic, max(first, judged - span), until)
            for start in sorted(s for s in have if s >= judged):  # only a window with items can raise an alert
                n_hist = int(min(rules.baseline, (start - first) // ws))
                hist = [have.get(start - k * ws) or Window(start - k * ws) for k in range(n_hist, 0, -1)]
                cusum, found = judge(have[start], hist, rules, cusum)
                for f in found:
                    st.add_alert(topic, f.kind, start, self._payload(topic, have[start], f))
            st.set_cusum(topic, cusum)
        st.set_meta("judged_until", repr(float(until)))

    def _payload(self, topic: str, w: Window, f) -> dict:
        b = {k: round(v, 4) if isinstance(v, float) else v for k, v in f.baseline.items()}
        return {"topic": topic, "kind": f.kind, "window": [iso(w.start), iso(w.start + self.window_s)],
                "time": iso(w.start + self.window_s), "count": w.count, "negative": w.negative,
                "share_negative": round(w.negative / w.count, 4) if w.count else 0.0,
                "mean_sentiment": round(w.mean, 4), "z": round(f.z, 3), "message": f"{topic}: {f.message}",
                "baseline": b, "headlines": [{**h, "time": iso(h["time"])} for h in
                                             self.state.window_items(topic, w.start, HEADLINES)]}

    def deliver(self) -> list[dict]:
        """Send the alerts committed but not sent yet (after a crash: at least once), then mark them sent."""
        pending = self.state.undelivered()
        for _, alert in pending:
            self.sinks.send(alert)
        if pending:
            with self.state.batch():
                self.state.mark_delivered([i for i, _ in pending])
        return [a for _, a in pending]

    # ------------------------------------------------------------------------------------------------------------
    def progress(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        mark = self.state.watermark
        future = f", {self.future:,} dated over a day ahead (skipped)" if self.future else ""
        return (f"{self.seen:,} items read, {self.added:,} new ({self.added / dt:,.0f}/s), {self.duplicates:,} "
                f"duplicates, {self.late:,} late{future}, {self.sinks.sent} alerts, up to {iso(mark) if mark else '-'}")

    def close(self, drain_s: float = 10.0) -> None:
        self.sinks.close(drain_s)
        self.state.close()


def log(msg: str) -> None:
    print(f"monitor: {msg}", file=sys.stderr, flush=True)
