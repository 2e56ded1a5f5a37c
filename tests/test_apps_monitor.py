"""The news sentiment monitor (nnforge app monitor): real streams (files, a watched folder, stdin, its own HTTP
endpoint on 127.0.0.1), a real SQLite state, a real webhook receiver, and the dashboard in headless Chromium.

    .venv/bin/pytest tests/test_apps_monitor.py -q

The sentiment model is an nnforge fasttext run trained here on headlines built from a small vocabulary (seconds),
so the test streams, built from the same vocabulary, are scored without doubt. The streams are hourly: a calm one
(6 to 8 items an hour per topic, 0 to 2 of them negative) and the same with a surge of negative airline headlines
planted in one hour. The shipped example (MiniLM, the Guardian headlines) runs once, briefly, at the end.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import DEADLINE, free_port, wait_for

import nnforge
from nnforge.apps._yaml import AppFileError
from nnforge.apps.monitor.detect import Rules, Window, drift, judge
from nnforge.apps.monitor.topics import Tagger, read_topics

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
T0 = 1_583_020_800  # 2020-03-01T00:00:00Z
SURGE_HOUR = 36
SUBJECTS = {"airlines": ["Skyway airline", "Jetstream flights", "the airline Aerolux"],
            "banks": ["Northgate bank", "the lender Crestmark", "Harbour bank"],
            "other": ["Acme widgets", "the toy maker Tumble", "Quarry cement"]}
PHRASES = {"negative": ["slumps", "collapses", "cuts thousands of jobs", "posts huge loss", "crashes",
                        "warns of heavy losses", "plunges into crisis"],
           "positive": ["soars", "beats forecasts", "hires thousands", "posts record profit", "rallies",
                        "doubles sales"],
           "neutral": ["names new chair", "moves headquarters", "sets results date", "updates its website",
                       "holds annual meeting"]}
TOPICS = """\
topics:
  airlines:
    keywords: [airline, flights]
  banks:
    keywords: [bank, lender]
"""


def cli(*args: str, input: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnforge.cli", "app", "monitor", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, input=input, timeout=timeout)




def stored(state: Path, sql: str, *args):
    """A query on the monitor's state file (read-only; 0 rows while the file does not exist yet)."""
    if not state.is_file():
        return []
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


def windows(state: Path) -> list[tuple]:
    return stored(state, "SELECT topic, start, count, negative, round(sum_score, 4) FROM windows ORDER BY topic, start")


def headline(rng, topic: str, mood: str) -> str:
    return f"{rng.choice(SUBJECTS[topic])} {rng.choice(PHRASES[mood])}"


def stream(rng, surge: bool, hours: int = 48) -> list[dict]:
    rows = []
    for h in range(hours):
        for topic in SUBJECTS:
            n, bad = int(rng.integers(6, 9)), int(rng.integers(0, 3))
            moods = ["negative"] * bad + [str(rng.choice(["positive", "neutral"])) for _ in range(n - bad)]
            if surge and topic == "airlines" and h == SURGE_HOUR:
                moods += ["negative"] * 15
            for mood in moods:
                rows.append({"time": T0 + h * 3600 + int(rng.integers(0, 3600)), "text": headline(rng, topic, mood)})
    order = rng.permutation(len(rows))  # files are not in time order: the replay sorts them
    return [rows[i] for i in order]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["time", "text"])
        w.writeheader()
        for r in rows:
            w.writerow({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["time"])), "text": r["text"]})
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("monitor")
    rng = np.random.default_rng(0)
    labelled = [(f"{s} {p}", mood) for mood, ps in PHRASES.items() for p in ps for subs in SUBJECTS.values()
                for s in subs]
    with (root / "sentiment.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(labelled)
    run = nnforge.train("text", data=str(root / "sentiment.csv"), model="fasttext", out=str(root), name="sentiment",
                        epochs=15, lr=0.05, seed=0, val_split=0.15, test_split=0.0)
    (root / "topics.yaml").write_text(TOPICS)
    return {"root": root, "model": str(run.path), "topics": str(root / "topics.yaml"),
            "calm": write_csv(root / "calm.csv", stream(rng, surge=False)),
            "surge": write_csv(root / "surge.csv", stream(np.random.default_rng(1), surge=True))}


def monitor_args(work: dict, state: Path, *extra: str) -> list[str]:
    return ["--model", work["model"], "--topics", work["topics"], "--window", "1h", "--state", str(state), *extra]


@pytest.fixture(scope="module")
def surge_run(work) -> dict:
    state = work["root"] / "surge" / "state.db"
    res = cli(*monitor_args(work, state, "--stream", str(work["surge"])))
    assert res.returncode == 0, res.stderr[-3000:]
    alerts = [json.loads(line) for line in (state.parent / "alerts.jsonl").read_text().splitlines()]
    return {"state": state, "alerts": alerts, "stdout": res.stdout, "stderr": res.stderr}


# ---------------------------------------------------------------------------------------------------------------
# files and rules


@pytest.mark.parametrize("text, line, words", [
    ("topics:\n  airlines:\n    keyword: [x]\n", 3, "unknown key 'keyword'"),
    ("topics:\n  airlines: {}\n", 2, "neither keywords nor a description"),
    ("topics:\n  all:\n    keywords: [x]\n", 2, "reserved"),
    ("topics:\n  a:\n    keywords: [x, 'b*c']\n", 3, "* only at its end"),
    ("similarity: 2\ntopics:\n  a:\n    keywords: [x]\n", 1, "between -1 and 1"),
    ("topics:\n  a:\n    keywords: [x]\n  a:\n    keywords: [y]\n", 4, "repeats the one on line 2"),
    ("topics: [a, b]\n", 1, "topics must be a mapping"),
])
def test_a_bad_topics_file_is_refused_with_its_line(tmp_path, text, line, words):
    path = tmp_path / "topics.yaml"
    path.write_text(text)
    with pytest.raises(AppFileError) as err:
        read_topics(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and words in str(err.value), str(err.value)


def test_keywords_match_whole_words_and_prefixes_and_descriptions_match_by_meaning(tmp_path):
    path = tmp_path / "topics.yaml"
    path.write_text("similarity: 0.9\ntopics:\n  banks:\n    keywords: [bank*, \"Bank of England\"]\n"
                    "  air:\n    keywords: [airline]\n    description: planes\n"
                    "  ships:\n    description: boats\n")
    topics, similarity = read_topics(path)
    words = ["planes", "boats", "trains"]

    def embed(texts):  # a stand-in encoder: one dimension per word of `words`
        return np.array([[t.count(w) for w in words] for t in texts], float)

    tagger = Tagger(topics, similarity, embed)
    got = tagger.tag(["Banking shares fall", "The Bank  of England acts", "embankment opens", "airlines merge",
                      "new planes ordered", "boats and planes"])
    assert got == [["all", "banks"], ["all", "banks"], ["all"], ["all"], ["all", "air"], ["all"]]
    # "airlines" is not the whole word "airline"; "boats and planes" is as near one description as the other: cosine
    # 0.71 < 0.9, so neither


def test_the_detectors_ignore_small_counts_and_catch_a_slow_slide():
    rules = Rules(min_baseline=6, baseline=24, min_count=5, cusum_h=5.0)
    calm = [Window(i * 3600.0, 10, 1, 3.0, 10.0) for i in range(24)]  # mean +0.3, 1 in 10 negative
    _, found = judge(Window(0, 2, 2, -1.8, 1.62), [Window(i, 0, 0, 0, 0) for i in range(24)], rules, 0.0)
    assert found == []  # two negative headlines in a quiet topic are not an alert
    _, found = judge(Window(0, 10, 8, -5.0, 9.0), calm, rules, 0.0)
    assert {f.kind for f in found} == {"surge", "shift"}
    _, found = judge(Window(0, 10, 8, -5.0, 9.0), calm[:5], rules, 0.0)
    assert found == []  # not enough history yet
    # every window's mean is about one standard error (0.30) below the baseline's, with as many negative items: no
    # single window is unusual, but eleven in a row are a slide (CUSUM: +0.49 a window, past 5 at the eleventh)
    s, slides, kinds = 0.0, [], set()
    for _ in range(12):
        w = Window(0, 10, 1, 0.0, 10.0)
        kinds |= {f.kind for f in judge(w, calm, Rules(cusum_h=1e9), 0.0)[1]}
        s, f = drift(w, calm, rules, s)
        slides.append(f)
    assert kinds == set()
    assert [i for i, f in enumerate(slides) if f is not None] == [10] and slides[10].kind == "drift"


# ---------------------------------------------------------------------------------------------------------------
# alerts


def test_a_planted_surge_raises_an_alert_with_the_headlines_behind_it(surge_run):
    surge = [a for a in surge_run["alerts"] if a["topic"] == "airlines" and a["kind"] in ("surge", "shift")]
    assert surge, surge_run["alerts"]
    hour = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + SURGE_HOUR * 3600))
    assert {a["window"][0] for a in surge} == {hour}
    a = next(a for a in surge if a["kind"] == "surge")
    assert a["negative"] >= 15 and a["z"] >= 3 and len(a["headlines"]) == 10
    assert all(any(p in h["text"] for p in PHRASES["negative"]) for h in a["headlines"])
    assert all(x["topic"] in ("airlines", "all") for x in surge_run["alerts"]), surge_run["alerts"]
    assert f"ALERT {hour} [airlines] surge" in surge_run["stdout"]


def test_a_calm_stream_raises_no_alert(work):
    state = work["root"] / "calm" / "state.db"
    res = cli(*monitor_args(work, state, "--stream", str(work["calm"])))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ALERT" not in res.stdout
    assert not (state.parent / "alerts.jsonl").exists() or not (state.parent / "alerts.jsonl").read_text()
    counted = stored(state, "SELECT sum(count) FROM windows WHERE topic = 'all'")[0][0]
    assert counted == len(list(csv.DictReader(work["calm"].open())))


def test_a_dead_webhook_never_stops_the_monitor(work):
    state = work["root"] / "dead-hook" / "state.db"
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    res = cli(*monitor_args(work, state, "--stream", str(work["surge"]), "--alert-webhook", url,
                            "--webhook-retries", "2", "--webhook-backoff", "0.05"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[airlines] surge" in res.stdout
    assert f"webhook {url} failed" in res.stderr and "after 3 attempt(s)" in res.stderr
    assert (state.parent / "alerts.jsonl").read_text().count('"airlines"') >= 1


class Receiver(BaseHTTPRequestHandler):
    """A webhook target that answers 503 to the first POST and 200 to the next ones."""
    got: list = []
    calls = 0

    def do_POST(self):  # noqa: N802 (the http.server API)
        type(self).calls += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls == 1:
            self.send_response(503)
        else:
            type(self).got.append(json.loads(body))
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_webhook_is_retried_with_backoff_until_it_takes_the_alert(work):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        state = work["root"] / "hook" / "state.db"
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        res = cli(*monitor_args(work, state, "--stream", str(work["surge"]), "--alert-webhook", url,
                                "--webhook-backoff", "0.05", "--quiet"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "ALERT" not in res.stdout  # --quiet
        alerts = [json.loads(line) for line in (state.parent / "alerts.jsonl").read_text().splitlines()]
        assert Receiver.calls == len(alerts) + 1 and Receiver.got == alerts
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# state


def test_a_restart_counts_nothing_twice(work, surge_run):
    reference = windows(surge_run["state"])
    state = work["root"] / "restart" / "state.db"
    # killed with SIGKILL part-way through a slow replay (one item per transaction), then run again to the end
    proc = subprocess.Popen([sys.executable, "-m", "nnforge.cli", "app", "monitor",
                             *monitor_args(work, state, "--stream", str(work["surge"]), "--speed", "20000")],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (stored(state, "SELECT count(*) FROM items") or [(0,)])[0][0] >= 300,
                 "the slow replay to count 300 items")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE)
    partial = stored(state, "SELECT count(*) FROM items")[0][0]
    assert 300 <= partial < sum(w[2] for w in reference if w[0] == "all")
    again = cli(*monitor_args(work, state, "--stream", str(work["surge"])))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{partial:,} duplicates" in again.stderr
    assert windows(state) == reference
    alerts = lambda: stored(state, "SELECT topic, kind, start FROM alerts ORDER BY 1, 2, 3")  # noqa: E731
    assert alerts() == stored(surge_run["state"], "SELECT topic, kind, start FROM alerts ORDER BY 1, 2, 3")
    # and once more, complete: nothing new is counted and no alert is raised twice
    once_more = cli(*monitor_args(work, state, "--stream", str(work["surge"])))
    assert once_more.returncode == 0 and "every item was counted before" in once_more.stderr
    assert "ALERT" not in once_more.stdout and windows(state) == reference


def test_a_state_built_with_other_settings_is_refused(work, surge_run):
    res = cli(*monitor_args(work, surge_run["state"], "--stream", str(work["surge"]))[:-4], "--window", "30m",
              "--state", str(surge_run["state"]), "--stream", str(work["surge"]))
    assert res.returncode == 2 and "was built with windows of 3600 s, not 1800 s" in res.stderr


# ---------------------------------------------------------------------------------------------------------------
# the other streams


def test_stdin_takes_json_lines_and_reports_bad_lines_by_number(work):
    rng = np.random.default_rng(5)
    lines = [json.dumps({"time": T0 + i * 60, "text": headline(rng, "banks", "neutral")}) for i in range(30)]
    lines.insert(3, "{broken json")
    lines.insert(7, json.dumps({"time": "yesterday-ish", "text": "Harbour bank soars"}))
    state = work["root"] / "stdin" / "state.db"
    res = cli(*monitor_args(work, state, "--stream", "-"), input="\n".join(lines) + "\n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipped stdin:4: not JSON" in res.stderr
    assert "skipped stdin:8: time 'yesterday-ish': expected an ISO 8601 date/time" in res.stderr
    assert stored(state, "SELECT sum(count) FROM windows WHERE topic = 'banks'")[0][0] == 30


def test_a_watched_folder_reads_each_new_file_once(work, tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    state = tmp_path / "state.db"
    rows = stream(np.random.default_rng(2), surge=False, hours=6)
    first = [r for r in rows if r["time"] < T0 + 3 * 3600]  # files arrive in time order: the next one is newer
    second = [r for r in rows if r["time"] >= T0 + 3 * 3600]

    def drop(name: str, part: list[dict]) -> None:  # written beside, then renamed in: never seen half-written
        write_csv(tmp_path / name, part).replace(folder / name)

    def start():
        return subprocess.Popen([sys.executable, "-m", "nnforge.cli", "app", "monitor",
                                 *monitor_args(work, state, "--stream", str(folder), "--poll", "0.1")],
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=(tmp_path / "err.log").open("a"))

    def counted():
        return (stored(state, "SELECT count(*) FROM items") or [(0,)])[0][0]

    proc = start()
    try:
        drop("a.csv", first)
        wait_for(lambda: counted() == len(first), lambda: f"a.csv to be counted ({counted()} so far)")
        (folder / "broken.csv").write_text("headline_missing,when\nx,y\n")
        drop("b.csv", second)
        wait_for(lambda: counted() == len(rows), lambda: f"b.csv to be counted ({counted()} so far)")
        wait_for(lambda: "skipped" in (tmp_path / "err.log").read_text() and "broken.csv" in
                 (tmp_path / "err.log").read_text(), "the broken file to be reported")
        assert proc.poll() is None  # a bad file does not stop the watcher
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    proc = start()  # a restarted watcher does not read the same files again
    try:
        later = [{**r, "time": r["time"] + 6 * 3600} for r in stream(np.random.default_rng(3), surge=False, hours=1)]
        drop("c.csv", later)
        wait_for(lambda: len(stored(state, "SELECT path FROM files")) == 4, "c.csv to be read")
        wait_for(lambda: "read c.csv" in (tmp_path / "err.log").read_text(), "the log of c.csv")
        log = (tmp_path / "err.log").read_text()
        assert f"read c.csv: {len(later)} items ({len(later)} new, 0 late, 0 duplicates)" in log
        assert log.count("read a.csv") == 1 and log.count("read b.csv") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    assert counted() == len(rows) + len(later)


def test_the_http_endpoint_takes_items_and_refuses_bad_requests(work, tmp_path):
    port = free_port()
    state = tmp_path / "state.db"
    proc = subprocess.Popen([sys.executable, "-m", "nnforge.cli", "app", "monitor",
                             *monitor_args(work, state, "--stream", "http", "--port", str(port))],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=(tmp_path / "err.log").open("w"))
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            pytest.fail((tmp_path / "err.log").read_text())
        try:
            return httpx.get(url + "/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, "the monitor's endpoint")
        rows = sorted(stream(np.random.default_rng(1), surge=True), key=lambda r: r["time"])
        raised = []
        for i in range(0, len(rows), 200):
            r = httpx.post(url + "/v1/items", json={"items": rows[i:i + 200]}, timeout=DEADLINE)
            assert r.status_code == 200, r.text
            raised += r.json()["alerts"]
        again = httpx.post(url + "/v1/items", json={"items": rows[:50]}, timeout=DEADLINE).json()
        assert again["accepted"] == 0 and again["duplicates"] + again["late"] == 50
        assert any(a["topic"] == "airlines" and a["kind"] == "surge" for a in raised)
        assert httpx.get(url + "/v1/alerts").json()["alerts"]
        assert httpx.get(url + "/v1/stats").json()["items"] == len(rows)
        page = httpx.get(url + "/")
        assert page.status_code == 200 and 'data-topic="airlines"' in page.text
        bad = [({"items": []}, 400, "at least one item"), ({"items": [{"text": "x"}]}, 400, 'no "time"'),
               ({"items": [{"text": 5, "time": 1}]}, 400, "items[0]"),
               ({"items": [{"text": "x", "time": "soon"}]}, 400, "ISO 8601"),
               ({"items": [{"text": "x", "time": 1, "mood": "sad"}]}, 400, "unknown field"),
               ({"items": [{"text": "x" * 6000, "time": 1}]}, 413, "limit is 5000"),
               ({"items": [{"text": "x", "time": i} for i in range(1001)]}, 413, "limit is 1000")]
        for body, status, words in bad:
            r = httpx.post(url + "/v1/items", json=body, timeout=DEADLINE)
            assert r.status_code == status and words in r.json()["detail"], (body, r.text)
        r = httpx.post(url + "/v1/items", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = httpx.post(url + "/v1/items", content=b"x" * (5 * 2**20), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.get(url + "/health", headers={"host": "evil.example"}).status_code == 421
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE)


# ---------------------------------------------------------------------------------------------------------------
# the dashboard in a real browser


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install it with `apt-get install -y chromium`")
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=DEADLINE)


def test_the_dashboard_renders_charts_alert_markers_and_headlines(surge_run, tmp_path):
    res = cli("dashboard", str(surge_run["state"]), "--dashboard", str(tmp_path / "dash.html"))
    assert res.returncode == 0, res.stderr
    page = tmp_path / "dash.html"
    dom = _chromium(tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for topic in ("all", "airlines", "banks"):
        assert f'<svg class="chart" data-topic="{topic}"' in html
    hour = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + SURGE_HOUR * 3600))
    assert f'class="alert" data-window="{hour}"' in html
    assert 'class="alert-row" data-topic="airlines" data-kind="surge"' in html
    assert html.count("<li>") >= 10 and "src=" not in html and "<script" not in html and "href=" not in html
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(1 << 20)
    assert colours is not None and len(colours) > 200, "the dashboard looks blank"


# ---------------------------------------------------------------------------------------------------------------
# the shipped example, once, briefly (its default model: MiniLM)


def test_the_example_replays_the_guardian_headlines_offline(tmp_path):
    res = cli("--example", "--limit", "120", "--out", str(tmp_path), "--quiet", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "monitor" / "example"
    assert (folder / "text" / "sentiment-minilm" / "checkpoints" / "best.safetensors").is_file()
    state = folder / "state.db"
    assert stored(state, "SELECT count(*) FROM items")[0][0] == 120
    topics = {t for (t,) in stored(state, "SELECT DISTINCT topic FROM windows")}
    assert "all" in topics and len(topics) >= 4
    mark = float(stored(state, "SELECT value FROM meta WHERE key = 'watermark'")[0][0])
    assert time.strftime("%Y-%m", time.gmtime(mark)) == "2020-01"  # the oldest headlines come first
    assert 'data-topic="all"' in (folder / "dashboard.html").read_text()
