"""The server's side of continuous learning, with real server processes on 127.0.0.1: capture, following a registry
alias, drift on /metrics.

    .venv/bin/pytest tests/test_capture_serve.py -q

Two servers start together: `capture` (the tiny run, --capture with no random sample and thresholds chosen from
the model's own answers, so some inputs fall below them and some do not; its drift window is tested too) and
`follow` (`nnforge serve shapes@champion` of a real registry whose champion moves between two trained runs while
clients keep asking; it also captures everything into a store of 2 kB, whose bound the last test on it checks after
stopping it). Waits are for conditions (conftest.wait_for), never sleeps.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import CLASSES, DEADLINE, Server, post, scrape, value, wait_for
from PIL import Image

import nnforge
from nnforge.deploy.capture import CaptureStore
from nnforge.deploy.drift import DriftWindow
from nnforge.evaluation.drift import psi, reading
from nnforge.loop.drift import parse_drift, read_drift
from nnforge.loop.registry import Registry


def noise_png(rng: np.random.Generator, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def split_point(values: list[float], lo: float = 0.2, hi: float = 0.8) -> float:
    """A threshold with between lo and hi of `values` below it, in the widest gap between them there (the tiny
    model's probabilities differ in the fourth digit: the gap keeps float noise between the test's PyTorch and the
    server's from moving an answer across it)."""
    v = sorted(values)
    i = max(range(int(lo * len(v)), int(hi * len(v))), key=lambda i: v[i + 1] - v[i])
    assert v[i + 1] - v[i] > 1e-5, f"no usable gap in {v}"
    return (v[i] + v[i + 1]) / 2


def hand_psi(expected: list[float], actual: list[float], eps: float = 1e-4) -> float:
    e = np.maximum(np.asarray(expected, float) / sum(expected), eps)
    a = np.maximum(np.asarray(actual, float) / sum(actual), eps)
    return float(sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True)))


def send(url: str, inputs: list[tuple[str, bytes]], per_request: int = 8) -> list[dict]:
    """Every input as a multipart file, `per_request` to a request; the answers in order, each with its probabilities
    in class order (the server's top_k is all three classes)."""
    rows = []
    with httpx.Client(base_url=url, timeout=DEADLINE) as c:
        for i in range(0, len(inputs), per_request):
            chunk = inputs[i:i + per_request]
            r = c.post("/v1/predict", files=[("file", (name, data, "image/png")) for name, data in chunk])
            assert r.status_code == 200, r.text
            body = r.json()
            for row in body["predictions"]:
                probs = dict(zip(row["labels"], row["probs"], strict=True))
                rows.append({"name": row["input"], "top": row["probs"][0], "label": row["labels"][0],
                             "margin": row["probs"][0] - row["probs"][1], "probs": [probs[c] for c in CLASSES],
                             "version": body["version"], "run": body["run"]})
    return rows


# ------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def inputs(png_tree, tmp_path_factory) -> list[tuple[str, bytes]]:
    """The tree's good pictures and as many of noise, each under its own name (the model is unsure of some)."""
    rng = np.random.default_rng(7)
    out = [(f"{p.parent.name}-{p.name}", p.read_bytes()) for p in sorted(png_tree.glob("*/[0-9]*.png"))]
    out += [(f"noise-{i:02d}.png", noise_png(rng)) for i in range(len(out))]
    return out


@pytest.fixture(scope="module")
def thresholds(trained_run, inputs, tmp_path_factory) -> tuple[float, float]:
    """(top-probability threshold, margin threshold) that split the inputs: chosen from `nnforge predict`."""
    folder = tmp_path_factory.mktemp("probe")
    paths = []
    for name, data in inputs:
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    rows = nnforge.predict(trained_run, paths, top_k=3)
    tops = [r["probs"][0] for r in rows]
    margins = [r["probs"][0] - r["probs"][1] for r in rows]
    return split_point(tops), split_point(margins, 0.1, 0.4)


@pytest.fixture(scope="module")
def second_run(trained_run, tmp_path_factory) -> Path:
    """A second trained run folder for the registry's champion to move to: a copy of the tiny run under another
    name (training one more would double this file's time; the answers tell the runs apart by name)."""
    dst = tmp_path_factory.mktemp("r2") / "tiny2"
    shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns(".lock", "tb"))
    return dst


@pytest.fixture(scope="module")
def registry(trained_run, second_run, tmp_path_factory) -> Registry:
    reg = Registry(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}")
    assert reg.add("shapes", trained_run).aliases == ["champion"]
    assert reg.add("shapes", second_run).version == 2
    return reg


@pytest.fixture(scope="module")
def servers(trained_run, thresholds, registry, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    threshold, margin = thresholds
    started = {
        "capture": Server(trained_run, logs / "capture.log", "--capture", str(logs / "captured"),
                          "--capture-sample", "0", "--capture-threshold", str(threshold),
                          "--capture-margin", str(margin), "--timeout", str(DEADLINE)),
        "follow": Server("shapes@champion", logs / "follow.log", "--registry", registry.url,  # type: ignore[arg-type]
                         "--capture", str(logs / "bounded"), "--capture-sample", "1", "--capture-max-mb", "0.002",
                         "--timeout", str(DEADLINE)),
    }
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.terminate()
        codes = {name: s.stop() for name, s in started.items()}
    assert codes == {name: 0 for name in started}, "a server did not exit cleanly on SIGTERM"


# ------------------------------------------------------------------------------------------------------------
# unit: the statistic


def test_psi_matches_a_hand_computation():
    # shares 0.5/0.5 -> 0.25/0.75: (0.25-0.5) ln(0.25/0.5) + (0.75-0.5) ln(0.75/0.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5), abs=1e-12)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.274653, abs=1e-6)
    # an empty bin counts as a share of 1e-4: (1-0.5) ln(1/0.5) + (1e-4-0.5) ln(1e-4/0.5)
    assert psi([1, 1], [3, 0]) == pytest.approx(0.5 * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5), abs=1e-12)
    assert psi([3, 1, 0], [3, 1, 0]) == 0.0
    assert [reading(x) for x in (0.0, 0.099, 0.1, 0.2, 0.26, math.nan)] == \
        ["stable", "stable", "moderate", "moderate", "significant", "unknown"]
    with pytest.raises(ValueError, match="same length"):
        psi([1, 2], [1, 2, 3])


def test_the_drift_window_keeps_the_last_answers_only():
    ref = {"split": "test", "n": 4, "confidence": [0] * 9 + [4], "classes": ["a", "b"], "predicted": [2, 2]}
    w = DriftWindow(size=4, min_answers=3)
    w.reset(ref, ["a", "b"])
    w.observe(np.array([[0.95, 0.05], [0.05, 0.95]]))
    assert w.psi() == {}  # two answers: too few for a score
    w.observe(np.array([[0.55, 0.45]] * 3))  # five answers: the first falls out
    assert len(w.answers) == 4 and w.predicted == [3, 1] and w.confidence[5] == 3 and w.confidence[9] == 1
    scores = w.psi()
    assert scores["class"] == pytest.approx(hand_psi([2, 2], [3, 1]))
    assert scores["confidence"] == pytest.approx(hand_psi(ref["confidence"], w.confidence))
    w.reset(None, [])
    assert w.psi() == {} and w.scores()["reference"] is None


def test_read_drift_parses_every_workers_scores():
    text = "\n".join(['# TYPE nnforge_drift_psi gauge', 'nnforge_drift_psi{pid="11",signal="confidence"} 0.05',
                      'nnforge_drift_psi{pid="11",signal="class"} 0.4',
                      'nnforge_drift_psi{pid="12",signal="class"} NaN', 'nnforge_drift_window{pid="11"} 2000.0',
                      'nnforge_drift_window{pid="12"} 17.0', 'nnforge_ready 1.0'])
    parsed = parse_drift(text)
    assert parsed["11"] == {"confidence": 0.05, "class": 0.4, "window": 2000}
    assert parsed["12"]["window"] == 17 and math.isnan(parsed["12"]["class"])


# ------------------------------------------------------------------------------------------------------------
# capture


def test_capture_keeps_only_low_confidence_inputs_and_the_bytes_as_sent(servers, inputs, thresholds, trained_run):
    s = servers["capture"]
    threshold, margin = thresholds
    store = CaptureStore(s.log.parent / "captured")
    last = max([it["id"] for it in store.items()], default=0)
    before = scrape(s.url)
    rows = send(s.url, inputs)
    unsure = {r["name"] for r in rows if r["top"] < threshold or r["margin"] < margin}
    assert 0 < len(unsure) < len(rows), (threshold, margin, sorted(r["top"] for r in rows))
    m = scrape(s.url)  # counted on the request path, before each answer
    assert value(m, "nnforge_capture_items_total", reason="low_confidence") - \
        value(before, "nnforge_capture_items_total", reason="low_confidence") == len(unsure)
    assert value(m, "nnforge_capture_items_total", reason="sample") == 0
    captured = wait_for(lambda: (got := store.items(after=last)) and len(got) >= len(unsure) and got,
                        lambda: f"{len(unsure)} items written; {len(store.items(after=last))} so far")
    assert {it["name"] for it in captured} == unsure and len(captured) == len(unsure)
    sent, answered = dict(inputs), {r["name"]: r for r in rows}
    for it in captured:
        assert it["confidence"] < threshold or it["margin"] < margin, it
        assert it["reason"] == "low_confidence" and it["status"] == "new"
        assert store.content(it) == sent[it["name"]] and it["file"].endswith(".png")  # as uploaded
        r = answered[it["name"]]
        assert it["prediction"] == r["label"] and it["confidence"] == pytest.approx(r["top"], abs=1e-5)
        assert it["version"] == r["version"] and it["run"] == str(trained_run)
    assert store.classes == CLASSES
    assert value(scrape(s.url), "nnforge_capture_dropped_total") == 0


# ------------------------------------------------------------------------------------------------------------
# following the registry's champion


def test_a_server_follows_the_champion_without_failing_a_request(servers, registry, trained_run, second_run, inputs):
    s = servers["follow"]
    name, data = inputs[0]
    stop, answers = threading.Event(), []  # (client, status, run)

    def client(i: int) -> None:
        with httpx.Client(base_url=s.url, timeout=DEADLINE) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", files={"file": (name, data, "image/png")})
                answers.append((i, r.status_code, r.json().get("run") if r.status_code == 200 else r.text))

    def answer_from(run: Path, since: int):
        return lambda: any(a[2] == run.name for a in answers[since:])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(answer_from(trained_run, 0), "answers from the first champion")
        assert httpx.get(s.url + "/v1/model").json()["following"] is True
        t0 = time.monotonic()
        registry.promote("shapes", 2)  # rewrites runs/registry/shapes/champion.json
        wait_for(answer_from(second_run, len(answers)), "answers from the promoted run")
        switched = time.monotonic() - t0
        registry.rollback("shapes")
        wait_for(answer_from(trained_run, len(answers)), "answers after the rollback")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [a for a in answers if a[1] != 200] == []
    first, promoted = trained_run.name, second_run.name
    for i in range(3):  # each client's answers: the first champion, the promoted run, the first again, in order
        runs = [a[2] for a in answers if a[0] == i]
        segments = [r for j, r in enumerate(runs) if j == 0 or r != runs[j - 1]]
        assert segments in ([first], [first, promoted], [first, promoted, first]), segments
    assert {a[2] for a in answers} == {trained_run.name, second_run.name}
    assert switched < 30, f"the server took {switched:.1f}s to follow the promotion"
    m = scrape(s.url)
    assert value(m, "nnforge_reloads_total", result="followed") == 2
    log = s.output()
    assert f"now serving {second_run}" in log and f"now serving {trained_run}" in log

    # a broken pointer is logged, and the model keeps serving
    pointer = registry.pointer("shapes", "champion")
    pointer.write_text("{not json")
    wait_for(lambda: f"following {pointer}: unreadable" in s.output(), "the server to log the broken pointer")
    r = post(s.url + "/v1/predict", files={"file": (name, data, "image/png")})
    assert r.status_code == 200 and r.json()["run"] == trained_run.name


def test_the_capture_store_stays_under_its_bound(servers, inputs):
    s = servers["follow"]  # it has captured every answer so far into 2 kB; this test ends it
    store = CaptureStore(s.log.parent / "bounded")
    sent = inputs[-40:]  # noise pictures of about 300 bytes each: 12 kB against a bound of 2 kB
    before = scrape(s.url)
    rows = send(s.url, sent, per_request=1)
    assert len(rows) == len(sent)
    m = scrape(s.url)
    metric = "nnforge_capture_items_total"
    chosen = sum(value(m, metric, reason=r) - value(before, metric, reason=r) for r in ("low_confidence", "sample"))
    assert chosen == len(sent)  # --capture-sample 1: every input is kept, until the bound drops the oldest
    assert s.stop() == 0  # the writer finishes its queue before the process exits
    counts = store.counts()
    files = list((store.folder / "items").iterdir())
    assert 0 < counts["total"] < len(sent) and counts["bytes"] <= 2000
    assert sum(f.stat().st_size for f in files) == counts["bytes"] and len(files) == counts["total"]
    kept = store.items()
    with sqlite3.connect(store.db) as db:
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()[0]
    assert last > len(kept)  # more were written than kept
    assert [it["id"] for it in kept] == list(range(last - len(kept) + 1, last + 1))  # the oldest went first
    order = [name for name, _ in sent]
    assert sorted(it["name"] for it in kept) == [it["name"] for it in kept] and \
        all(it["name"] in order for it in kept)  # from this test's requests (the noise files are named in order)
    assert all(store.content(it) == dict(sent)[it["name"]] for it in kept)


# ------------------------------------------------------------------------------------------------------------
# drift


def test_drift_scores_appear_on_metrics_and_in_v1_model(servers, trained_run, inputs):
    ref = json.loads((trained_run / "eval" / "reference.json").read_text())
    test_items = json.loads((trained_run / "split.json").read_text())["test"]
    assert ref["split"] == "test" and ref["n"] == len(test_items) and ref["classes"] == CLASSES
    assert sum(ref["confidence"]) == ref["n"] == sum(ref["predicted"]) and len(ref["confidence"]) == 10

    s = servers["capture"]
    before = scrape(s.url)
    circles = [(n, d) for n, d in inputs if n.startswith("circle-")]
    sent = [circles[i % len(circles)] for i in range(2100)]  # traffic of one class: the class signal must see it
    rows = send(s.url, sent, per_request=50)
    window = rows[-2000:]  # the worker's window: the last 2000 answers
    served_bins = np.bincount([min(int(r["top"] * 10), 9) for r in window], minlength=10).tolist()
    served_classes = [sum(r["label"] == c for r in window) for c in CLASSES]
    want = {"confidence": hand_psi(ref["confidence"], served_bins), "class": hand_psi(ref["predicted"], served_classes)}

    drift = httpx.get(s.url + "/v1/model").json()["drift"]  # computed when asked
    assert drift["window"] == 2000 and drift["reference"] == {"split": "test", "n": ref["n"]}
    for signal, psi_value in want.items():
        assert drift["signals"][signal]["psi"] == pytest.approx(psi_value, abs=1e-6)
        assert drift["signals"][signal]["reading"] == reading(psi_value)
    assert want["class"] > 0.25 and drift["signals"]["class"]["reading"] == "significant"  # one class of three

    def published() -> dict | None:  # the gauges are set every half second, once the window has moved
        m = scrape(s.url)
        got = {signal: value(m, "nnforge_drift_psi", signal=signal) for signal in want}
        return m if value(m, "nnforge_drift_window") == 2000 and \
            all(abs(got[k] - drift["signals"][k]["psi"]) < 1e-6 for k in want) else None

    m = wait_for(published, lambda: f"the drift gauges to read {drift['signals']}: {scrape(s.url)}")
    assert value(m, "nnforge_prediction_confidence_count") - value(before, "nnforge_prediction_confidence_count") \
        == len(rows)
    for c in CLASSES:
        assert value(m, "nnforge_predictions_total", **{"class": c}) - \
            value(before, "nnforge_predictions_total", **{"class": c}) == sum(r["label"] == c for r in rows)
    lines = read_drift(s.url)
    assert any(line.startswith(f"class: PSI {want['class']:.3f} (significant) over the last 2000") for line in lines), \
        lines
    assert any(line.startswith("confidence: PSI") for line in lines), lines
    assert read_drift("http://127.0.0.1:9")[0].startswith("could not read")


def test_served_answers_name_their_run(servers, trained_run, inputs):
    s = servers["capture"]
    name, data = inputs[0]
    body = post(s.url + "/v1/predict", files={"file": (name, data, "image/png")}).json()
    info = httpx.get(s.url + "/v1/model").json()
    assert body["run"] == info["run"] == trained_run.name and body["version"] == info["version"]
    assert info["capture"] is True and info["following"] is False
    assert list(body) == ["model", "version", "run", "backend", "predictions"]
