"""The two applications, measured: the bot's understanding and latency, the monitor's throughput and alert quality.

    python benchmarks/apps.py              # everything (about 30 minutes on 2 quiet cores; most of it MiniLM)
    python benchmarks/apps.py --smoke      # fasttext bot only, small streams: does it run? (a few minutes)
    python benchmarks/apps.py --only bot   # or --only monitor

Bot, on the shipped online-shop example (nnforge/apps/bot/example): each intent model is trained on the same split
of intents.yaml (HOLD_OUT of each intent held out), its out-of-scope threshold calibrated by the same method
(apps/bot/calibrate.py: Youden's J on the held-out examples and the file's out_of_scope messages), and scored on the
shipped test.csv (58 held-out utterances written apart from the intents file, 18 FAQ questions, 15 out-of-scope):
intent accuracy (the accepted intent is right), out-of-scope F1 (the positive class: no intent applies, i.e. the
faq and out_of_scope rows), false accept / false reject rates. Models: nnforge minilm (fine-tuned, the default),
nnforge fasttext, and TF-IDF (words 1-2, characters 2-5) + logistic regression with C picked on the held-out split,
as nnforge's text baseline does. Then `nnforge app bot serve` in a subprocess and CLIENTS threads, each with its
own session, sending the test messages in turn: /v1/chat latency p50/p99 and messages per second.

Monitor: items scored per second through the whole pipeline (scoring, topic tagging, SQLite, windows, detection) on
a synthetic day of a busy feed (50,000 headlines over 24 hours, hourly windows, the example's topics), for three
set-ups: fasttext sentiment with keyword topics, fasttext with keyword + embedding topics, and the example's default
(MiniLM, encoder frozen, keyword + embedding topics; on a 5,000-item slice, it is slow). Target: 50,000 in under a
minute. Then alert precision/recall: a week of hourly windows per seed, five topics at 4 to 9 items an hour each
(15% negative), with PLANTED surges of 6 to 15 extra negative items in random (topic, hour) after the first two
days; an alert is right when its topic and window hold a planted surge (an alert on "all" when any topic does);
recall is the share of planted surges with an alert. The headlines are built from a vocabulary written here, not
from the sentiment model's training sentences, so the sentiment model's own errors are part of the figure (its
accuracy on the planted stream's labels is printed beside it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._server import free_port, start_server  # noqa: E402
from nnforge import api  # noqa: E402
from nnforge.apps.bot import EXAMPLE as BOT_EXAMPLE  # noqa: E402
from nnforge.apps.bot.calibrate import calibrate, f1_out_of_scope  # noqa: E402
from nnforge.apps.bot.dialogue import Bot  # noqa: E402
from nnforge.apps.bot.evaluate import NOT_INTENTS, read_labelled, score  # noqa: E402
from nnforge.apps.bot.intents import read_intents  # noqa: E402
from nnforge.apps.bot.train import train_bot  # noqa: E402
from nnforge.apps.monitor import EXAMPLE as MONITOR_EXAMPLE  # noqa: E402
from nnforge.apps.monitor.alerts import Sinks  # noqa: E402
from nnforge.apps.monitor.monitor import Monitor  # noqa: E402
from nnforge.apps.monitor.streams import Item, batches, item_id, parse_time  # noqa: E402

CLIENTS = 8
T0 = 1_583_020_800  # 2020-03-01T00:00:00Z
SUBJECTS = {  # each names a topic of the example's topics.yaml by one of its keywords; MOODS name none
    "airlines": ["Skyway airline", "Jetstream Airways flights", "the regional airline Aerolux"],
    "banks": ["Northgate Bank", "the lender Crestmark", "Harbour Bank"],
    "retail": ["the retailer Pennywise", "Brightmart supermarkets", "the high street chain Dovetail"],
    "energy": ["the oil producer Petrova", "Greenfield Energy", "the gas supplier Calor Nord"],
    "cars": ["the carmaker Vantor", "Rivet Motors", "the car parts maker Axlewood"],
}
MOODS = {
    "negative": ["slumps after profit warning", "cuts output as sales fall", "collapses into "
                 "administration", "posts record loss", "hit by fraud investigation", "warns of bleak year ahead",
                 "fined over failings", "shuts sites as demand dries up"],
    "positive": ["jumps on strong results", "expands into three new countries", "beats profit forecasts",
                 "raises dividend as trading improves", "wins major contract", "reports bumper sales"],
    "neutral": ["appoints new finance chief", "to publish results on Thursday", "moves head office to Leeds",
                "confirms date of annual meeting", "renames its loyalty scheme", "updates its strategy"],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# bot


def tfidf_bot(folder: Path, spec, test_rows: list[tuple[str, str]]) -> dict:
    """TF-IDF + logistic regression on the bot's own split, with the same threshold method."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion

    def read(name):
        with (folder / "data" / name).open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [r["text"] for r in rows], [r["label"] for r in rows]

    t0 = time.perf_counter()
    (xtr, ytr), (xval, yval) = read("train.csv"), read("val.csv")
    feats = FeatureUnion([("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                          ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2,
                                                    sublinear_tf=True))])
    Xtr = feats.fit_transform(xtr)
    best = None
    for c in (1.0, 4.0, 16.0):  # as nnforge's text baseline: C picked on the held-out split
        clf = LogisticRegression(C=c, max_iter=3000).fit(Xtr, ytr)
        acc = float(np.mean(clf.predict(feats.transform(xval)) == np.array(yval)))
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    _, c, clf = best
    cal = calibrate(clf.predict_proba(feats.transform(xval)).max(1),
                    clf.predict_proba(feats.transform(spec.out_of_scope)).max(1))
    texts, labels = [t for t, _ in test_rows], [y for _, y in test_rows]
    p = clf.predict_proba(feats.transform(texts))
    top = clf.classes_[p.argmax(1)]
    accepted = p.max(1) >= cal["threshold"]
    inside = np.array([y not in NOT_INTENTS for y in labels])
    right = top == np.array(labels)
    return {"model": f"tfidf+logreg (C {c:g})", "train_s": round(time.perf_counter() - t0, 2),
            "threshold": cal["threshold"], "calibration": cal,
            "intent_accuracy": float(np.mean((accepted & right)[inside])),
            "top1_accuracy": float(np.mean(right[inside])),
            "out_of_scope": {**f1_out_of_scope(~inside, ~accepted), "false_accept": float(np.mean(accepted[~inside])),
                             "false_reject": float(np.mean(~accepted[inside]))}}


def bench_bot(out: Path, models: list[str], requests_per_client: int) -> dict:
    test_rows = read_labelled(BOT_EXAMPLE / "test.csv")
    spec = read_intents(BOT_EXAMPLE / "intents.yaml")
    results, folders = [], {}
    for model in models:
        log(f"bot: training the example with {model}")
        t0 = time.perf_counter()
        folder = train_bot(example=True, model=model, out=out, name=f"bench-{model}", force=True)
        train_s = time.perf_counter() - t0
        bot = Bot(folder, tickets=out / "tickets.jsonl")
        try:
            r = score(bot, test_rows)
        finally:
            bot.close()
        folders[model] = folder
        results.append({"model": f"nnforge {model}", "train_s": round(train_s, 1), **{k: r[k] for k in (
            "threshold", "intent_accuracy", "top1_accuracy", "out_of_scope", "fallback_rate", "handoff_rate",
            "faq_answered", "handed_off")}, "calibration": json.loads((folder / "bot.json").read_text())[
            "calibration"]})
    results.append(tfidf_bot(folders[models[0]], spec, test_rows))
    latency = chat_latency(folders[models[0]], test_rows, requests_per_client, out)
    return {"understanding": results, "latency": {"model": models[0], **latency},
            "test": {"n": len(test_rows), "in_scope": sum(y not in NOT_INTENTS for _, y in test_rows)}}


def chat_latency(folder: Path, rows: list[tuple[str, str]], per_client: int, out: Path) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "nnforge.cli", "app", "bot", "serve", str(folder), "--port",
                           str(port), "--tickets", str(out / "latency-tickets.jsonl"), "--timeout", "120"], url, ROOT,
                          seconds=300)
    try:
        messages = [t for t, _ in rows]
        for m in messages[:8]:  # warm-up: first calls of each code path
            httpx.post(url + "/v1/chat", json={"session": "warm", "message": m}, timeout=120)
        times: list[float] = []
        lock = threading.Lock()
        statuses: dict[int, int] = {}

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                for k in range(per_client):
                    msg = messages[(i * 7 + k) % len(messages)]
                    t = time.perf_counter()
                    r = c.post("/v1/chat", json={"session": f"client-{i}", "message": msg})
                    dt = time.perf_counter() - t
                    with lock:
                        times.append(dt)
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    ms = sorted(1000 * t for t in times)
    return {"clients": CLIENTS, "requests": len(ms), "statuses": statuses, "p50_ms": round(ms[len(ms) // 2], 1),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1), "mean_ms": round(statistics.mean(ms), 1),
            "messages_per_s": round(len(ms) / wall, 1)}


# ---------------------------------------------------------------------------------------------------------------
# monitor


def sentiment_run(out: Path, model: str) -> Path:
    """The example's sentiment model (as `nnforge app monitor --example` trains it), trained once per invocation."""
    extra = {"freeze_encoder": True, "lr": 3e-3, "epochs": 5} if model == "minilm" else {}
    run = api.train("text", data=str(MONITOR_EXAMPLE / "sentiment.csv"), model=model, out=str(out),
                    name=f"sentiment-{model}", seed=0, **extra)
    return run.path


def synthetic(rng, hours: int, per_hour: tuple[int, int], neg_share: float, surges: int,
              surge_size: tuple[int, int] = (6, 15), warmup: int = 48) -> tuple[list[Item], list[int], set]:
    """(items, true labels: 1 negative, planted (topic, hour start))."""
    items, truth, planted = [], [], set()
    topics = list(SUBJECTS)
    while len(planted) < surges:
        planted.add((str(rng.choice(topics)), T0 + 3600 * int(rng.integers(warmup, hours))))
    for h in range(hours):
        for topic in topics:
            n = int(rng.integers(per_hour[0], per_hour[1] + 1))
            moods = ["negative" if rng.random() < neg_share else str(rng.choice(["positive", "neutral"]))
                     for _ in range(n)]
            if (topic, T0 + 3600 * h) in planted:
                moods += ["negative"] * int(rng.integers(surge_size[0], surge_size[1] + 1))
            for mood in moods:
                t = T0 + 3600 * h + float(rng.uniform(0, 3600))
                text = f"{rng.choice(SUBJECTS[topic])} {rng.choice(MOODS[mood])}"
                items.append(Item(item_id(t, text + str(len(items))), t, text))
                truth.append(int(mood == "negative"))
    order = np.argsort([it.time for it in items], kind="stable")
    return [items[i] for i in order], [truth[i] for i in order], planted


def matches(alert: dict, planted: set) -> bool:
    """An alert is right when its topic and window hold a planted surge (an alert on "all": when any topic does)."""
    start = parse_time(alert["window"][0])
    return (alert["topic"], start) in planted or (alert["topic"] == "all" and start in {h for _, h in planted})


def run_stream(model: Path, items: list[Item], state: Path, keywords_only: bool) -> tuple[Monitor, float]:
    m = Monitor(model, state, MONITOR_EXAMPLE / "topics.yaml", 3600, sinks=Sinks(stdout=False),
                keywords_only=keywords_only)
    t0 = time.perf_counter()
    for batch in batches(items):
        m.process(batch)
    m.flush()
    return m, time.perf_counter() - t0


def bench_monitor(out: Path, n_items: int, minilm_items: int, seeds: list[int], hours: int, surges: int) -> dict:
    runs = {"fasttext": sentiment_run(out, "fasttext")}
    if minilm_items:
        runs["minilm"] = sentiment_run(out, "minilm")
    # a busy day: n_items over 24 hours
    rng = np.random.default_rng(0)
    per_hour = max(1, n_items // (24 * len(SUBJECTS)))
    day, _, _ = synthetic(rng, 24, (per_hour - 1, per_hour + 1), 0.15, 0)
    day = day[:n_items]
    speed = []
    for name, model, keywords_only, n in (("fasttext, keyword topics", "fasttext", True, n_items),
                                          ("fasttext, keyword + embedding topics", "fasttext", False, n_items),
                                          ("minilm (frozen), keyword + embedding topics", "minilm", False,
                                           minilm_items)):
        if not n or model not in runs:
            continue
        state = out / f"speed-{len(speed)}.db"
        m, secs = run_stream(runs[model], day[:n], state, keywords_only)
        speed.append({"setup": name, "items": n, "seconds": round(secs, 2), "items_per_s": round(n / secs, 1),
                      "seconds_for_50k": round(50_000 * secs / n, 1)})
        m.close()
        log(f"monitor: {name}: {n / secs:,.0f} items/s")
    quality = []
    for seed in seeds:
        items, truth, planted = synthetic(np.random.default_rng(100 + seed), hours, (4, 9), 0.15, surges)
        m, _ = run_stream(runs["fasttext"], items, out / f"pr-{seed}.db", True)
        alerts = m.state.alerts(100_000)
        scored = dict(m.state.db.execute("SELECT id, negative FROM items"))
        m.close()
        acc = float(np.mean([scored[it.id] == y for it, y in zip(items, truth, strict=True)]))
        found = {(a["topic"], a["window"][0]) for a in alerts if matches(a, planted)}
        detected = {p for p in planted if (p[0], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p[1]))) in found}
        quality.append({"seed": seed, "items": len(items), "planted": len(planted), "alerts": len(alerts),
                        "precision": sum(matches(a, planted) for a in alerts) / max(1, len(alerts)),
                        "recall": len(detected) / len(planted), "sentiment_accuracy": round(acc, 4),
                        "kinds": dict(sorted({k: sum(a["kind"] == k for a in alerts) for k in
                                              ("surge", "shift", "drift")}.items()))})
        log(f"monitor: seed {seed}: precision {quality[-1]['precision']:.3f}, recall {quality[-1]['recall']:.3f}")
    return {"speed": speed, "alerts": quality,
            "alerts_mean": {k: round(statistics.mean(q[k] for q in quality), 4) for k in
                            ("precision", "recall", "sentiment_accuracy")}}


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="fasttext bot, 8x5 chat requests, 2,000-item day, one "
                                                        "3-day stream")
    p.add_argument("--only", choices=["bot", "monitor"])
    p.add_argument("--out", help="where the runs go (default: a temporary folder, removed at the end)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="nnforge-apps-"))
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]), "smoke": a.smoke}
    try:
        if a.only in (None, "bot"):
            models = ["fasttext"] if a.smoke else ["minilm", "fasttext"]
            result["bot"] = bench_bot(out / "bot", models, 5 if a.smoke else 50)
        if a.only in (None, "monitor"):
            result["monitor"] = bench_monitor(out / "monitor", 2_000 if a.smoke else 50_000, 0 if a.smoke else 5_000,
                                              [0] if a.smoke else [0, 1, 2, 3, 4], 72 if a.smoke else 168,
                                              3 if a.smoke else 10)
    finally:
        if not a.out:
            shutil.rmtree(out, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    if "bot" in r:
        log("\nbot on the shipped example's test.csv "
            f"({r['bot']['test']['n']} messages, {r['bot']['test']['in_scope']} in scope)")
        log(f"{'model':28s} {'intent acc':>10s} {'top-1':>7s} {'OOS F1':>7s} {'FA':>6s} {'FR':>6s} {'thr':>6s}")
        for m in r["bot"]["understanding"]:
            o = m["out_of_scope"]
            log(f"{m['model']:28s} {m['intent_accuracy']:10.3f} {m['top1_accuracy']:7.3f} {o['f1']:7.3f} "
                f"{o['false_accept']:6.3f} {o['false_reject']:6.3f} {m['threshold']:6.3f}")
        lat = r["bot"]["latency"]
        log(f"/v1/chat ({lat['model']}, {lat['clients']} clients, {lat['requests']} requests): p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, {lat['messages_per_s']} messages/s, statuses {lat['statuses']}")
    if "monitor" in r:
        log("\nmonitor throughput (whole pipeline)")
        for s in r["monitor"]["speed"]:
            log(f"  {s['setup']:45s} {s['items_per_s']:9,.0f} items/s   50k in {s['seconds_for_50k']:7.1f} s")
        m = r["monitor"]["alerts_mean"]
        log(f"alerts on planted surges ({len(r['monitor']['alerts'])} seed(s)): precision {m['precision']:.3f}, "
            f"recall {m['recall']:.3f} (sentiment accuracy on the stream {m['sentiment_accuracy']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
