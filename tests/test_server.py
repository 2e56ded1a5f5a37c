"""`nnforge serve` as a real process on 127.0.0.1, spoken to over HTTP: answers, limits, security, reload, drain.

    .venv/bin/pytest tests/test_server.py -q

Four servers start together (their start-up overlaps): `main` (an exported image run, ONNX Runtime),
`guarded` (a token and tight limits: a queue of 2, a 1 s timeout, batches that wait up to 3 s for requests on
their way), `text` (an exported text run; the last test stops it with SIGTERM mid-request) and `workers` (two
processes).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import nnforge
import nnforge.api
from nnforge.deploy.server import create_app
from nnforge.deploy.settings import ServeSettings, is_loopback

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m nnforge.cli serve RUN ...` in a subprocess, its output in a log file."""

    def __init__(self, run: Path, log: Path, *args: str, env: dict | None = None):
        self.port, self.log, self.terminated = free_port(), log, False
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nnforge.cli", "serve", str(run), "--port", str(self.port), *args],
            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, headers: dict | None = None, timeout: float = 120) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", headers=headers, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout}s:\n{self.output()}")

    def terminate(self) -> None:
        if self.proc.poll() is None and not self.terminated:  # once: a second SIGTERM during exit would kill it
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self) -> int:
        self.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server ignored SIGTERM for 20 s:\n{self.output()}")


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with model.onnx (the servers serve it with ONNX Runtime)."""
    dst = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns("model*.onnx", "model.json", "tb"))
    nnforge.export(dst, exporter="torchscript")  # the quick exporter: this module tests serving, not export
    return dst


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A tiny text run (textcnn on a few reviews), exported: the server is generic over the input kind."""
    root = tmp_path_factory.mktemp("text")
    words = {"pos": "brilliant moving superb funny".split(), "neg": "dull tedious awful clumsy".split()}
    fill = "the film story cast plot was quite a".split()
    rng = np.random.default_rng(0)
    rows = [f'"{" ".join(rng.permutation(list(rng.choice(fill, 3)) + list(rng.choice(words[y], 2))))}",{y}'
            for i in range(48) for y in [("pos", "neg")[i % 2]]]
    (root / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    run = nnforge.train("text", data=str(root / "reviews.csv"), model="textcnn", out=str(root), name="reviews",
                        epochs=2, batch_size=16, precision="fp32", vocab_size=200, max_len=16, lr=3e-3,
                        val_split=0.2, test_split=0.0)
    nnforge.export(run.path, exporter="torchscript")
    return run.path


@pytest.fixture(scope="module")
def servers(run, text_run, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "main": Server(run, logs / "main.log", "--max-body-mb", "2", "--max-pixels", "1000000",
                       "--max-wait-ms", "20", "--max-inputs", "8"),
        "guarded": Server(run, logs / "guarded.log", "--max-queue", "2", "--max-wait-ms", "3000",
                          "--max-batch-size", "64", "--timeout", "1", env={"NNFORGE_TOKEN": TOKEN}),
        "text": Server(text_run, logs / "text.log"),
        "workers": Server(run, logs / "workers.log", "--workers", "2"),
    }
    try:
        started["main"].wait_ready()
        started["guarded"].wait_ready({"Authorization": f"Bearer {TOKEN}"})
        started["text"].wait_ready()
        started["workers"].wait_ready()
        yield started
    finally:
        for s in started.values():  # all at once: each shutdown waits a little for its connections
            s.terminate()
        codes = {name: s.stop() for name, s in started.items()}
    assert codes == {name: 0 for name in started}, "a server did not exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def main(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def images(run) -> list[Path]:
    return [Path(p) for p, _ in json.loads((run / "split.json").read_text())["test"]]


@pytest.fixture(scope="module")
def expected(run, images) -> dict[str, dict]:
    """What `nnforge predict` says for each test image (PyTorch, the run's checkpoint)."""
    return {str(r["input"]): r for r in nnforge.predict(run, [str(p) for p in images], top_k=3)}


def same_answer(got: dict, want: dict) -> None:
    assert got["labels"] == want["labels"], (got, want)
    np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-5)


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with no picture data: must be refused before any decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------------------
# answers


def test_health_ready_model_docs_and_metrics(main, run):
    assert httpx.get(main.url + "/health").json() == {"status": "ok"}
    assert httpx.get(main.url + "/ready").json()["ready"] is True
    info = httpx.get(main.url + "/v1/model").json()
    card = json.loads((run / "model.json").read_text())
    assert info["backend"] == "onnx" and info["name"] == card["model"]
    assert info["classes"] == card["io"]["output"]["classes"] and info["output"]["kind"] == "probs"
    assert info["input"]["shape"][0] == "batch" and info["preprocessing"] == card["io"]["input"]
    assert info["version"] == card["sha256"][:12]
    assert "/v1/predict" in httpx.get(main.url + "/openapi.json").json()["paths"]
    docs = httpx.get(main.url + "/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "POST&nbsp;/v1/predict" in docs.text and "413" in docs.text  # the endpoints and their answers
    assert "<script" not in docs.text and "cdn" not in docs.text.lower()  # self-contained: works offline


def test_server_and_predict_give_the_same_answer_for_the_same_file(main, images, expected):
    path = images[0]
    data = path.read_bytes()
    multipart = httpx.post(main.url + "/v1/predict", files={"file": (path.name, data, "image/png")}).json()
    as_json = httpx.post(main.url + "/v1/predict", json={"images": [base64.b64encode(data).decode()]}).json()
    raw = httpx.post(main.url + "/v1/predict", content=data, headers={"content-type": "image/png"}).json()
    for answer in (multipart, as_json, raw):
        assert answer["backend"] == "onnx" and len(answer["predictions"]) == 1
        same_answer(answer["predictions"][0], expected[str(path)])
    top1 = httpx.post(main.url + "/v1/predict?top_k=1", content=data, headers={"content-type": "image/png"}).json()
    assert top1["predictions"][0]["labels"] == expected[str(path)]["labels"][:1]


def test_several_images_in_one_request_keep_their_order(main, images, expected):
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images[:5]]
    answer = httpx.post(main.url + "/v1/predict", files=files).json()
    for p, got in zip(images[:5], answer["predictions"], strict=True):
        same_answer(got, expected[str(p)])


def test_concurrent_clients_all_get_correct_answers_in_shared_batches(main, images, expected):
    def client(i: int) -> list[tuple[Path, dict]]:
        out = []
        with httpx.Client(base_url=main.url, timeout=30) as c:
            for j in range(2):
                p = images[(i + j) % len(images)]
                if j % 2:
                    r = c.post("/v1/predict", json={"images": [base64.b64encode(p.read_bytes()).decode()]})
                else:
                    r = c.post("/v1/predict", files={"file": (p.name, p.read_bytes(), "image/png")})
                assert r.status_code == 200, r.text
                out.append((p, r.json()["predictions"][0]))
        return out

    with ThreadPoolExecutor(32) as pool:
        results = [pair for answers in pool.map(client, range(32)) for pair in answers]
    assert len(results) == 64
    for p, got in results:
        same_answer(got, expected[str(p)])
    metrics = httpx.get(main.url + "/metrics").text
    batches = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith("nnforge_batch_size_")}
    assert batches["nnforge_batch_size_sum"] > batches["nnforge_batch_size_count"], "no request shared a batch"


# ------------------------------------------------------------------------------------------------------------
# bad input: always a 4xx with a message, never a 500

BAD = {
    "garbage bytes": ({"content": b"\x00\x01garbage" * 50, "headers": {"content-type": "image/png"}},
                      400, "not an image"),
    "truncated png": ("truncated", 400, "truncated"),
    "empty body": ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty body"),
    "empty file in a form": ({"files": {"file": ("x.png", b"", "image/png")}}, 400, "x.png: empty"),
    "no content type": ({"content": b"abc"}, 415, "no Content-Type"),
    "wrong content type": ({"content": b"a,b\n1,2", "headers": {"content-type": "text/csv"}}, 415, "text/csv"),
    "huge dimensions": ({"content": png_header_only(100_000, 100_000), "headers": {"content-type": "image/png"}},
                        400, "pixels"),
    "over the pixel limit": ({"content": png_bytes(1200, 1000), "headers": {"content-type": "image/png"}},
                             400, "over the limit of 1000000"),
    "bad base64": ({"json": {"images": ["not base64!"]}}, 400, "images[0]: not valid base64"),
    "base64 of garbage": ({"json": {"images": [base64.b64encode(b"hello").decode()]}}, 400, "images[0]"),
    "a number for an image": ({"json": {"images": [42]}}, 400, "expected a base64 string"),
    "invalid json": ({"content": b'{"images": [', "headers": {"content-type": "application/json"}},
                     400, "not valid JSON"),
    "deeply nested json": ({"content": b"[" * 200_000, "headers": {"content-type": "application/json"}},
                           400, "nested too deeply"),
    "json without images": ({"json": {"texts": ["hi"]}}, 400, '"images"'),
    "empty image list": ({"json": {"images": []}}, 400, "non-empty list"),
    "too many images": ({"json": {"images": ["aGk="] * 9}}, 413, "the limit is 8"),
    "form without files": ({"content": b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--x--\r\n',
                            "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "no files"),
    "url-encoded form": ({"data": {"a": "b"}}, 415, "x-www-form-urlencoded"),
    "broken multipart": ({"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}},
                         400, ""),
    "bad top_k": ({"params": {"top_k": 0}, "content": b"x", "headers": {"content-type": "image/png"}}, 422, ""),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_input_gets_a_4xx_with_a_message(main, images, case):
    kwargs, status, words = BAD[case]
    if kwargs == "truncated":
        data = images[0].read_bytes()
        kwargs = {"content": data[: len(data) // 2], "headers": {"content-type": "image/png"}}
    r = httpx.post(main.url + "/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail and words in str(detail)


def test_mangled_images_never_get_a_500(main, images):
    rng = np.random.default_rng(0)
    good = images[0].read_bytes()
    codes = []
    with httpx.Client(base_url=main.url) as c:
        for _ in range(40):  # flipped bytes, cut files, spliced headers: each a 200 or a 4xx with a message
            data = bytearray(good)
            for i in rng.integers(0, len(data), rng.integers(1, 20)):
                data[i] = rng.integers(0, 256)
            data = bytes(data[: rng.integers(8, len(data) + 1)])
            r = c.post("/v1/predict", content=data, headers={"content-type": "image/png"})
            codes.append(r.status_code)
            assert r.status_code == 200 or (r.status_code == 400 and r.json()["detail"]), r.text
    assert 400 in codes


def test_a_50_mb_body_gets_413_quickly_while_health_still_answers(main):
    # Content-Length announces it: refused before the body is read
    t0 = time.monotonic()
    r = httpx.post(main.url + "/v1/predict", content=b"\0" * (50 << 20), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "Content-Length" in r.json()["detail"]
    assert time.monotonic() - t0 < 5

    # chunked, no length: counted as it arrives; a slow sender does not hold up anyone else
    def slow_50_mb():
        for _ in range(50):
            time.sleep(0.02)
            yield b"\0" * (1 << 20)

    result = {}
    sender = threading.Thread(target=lambda: result.update(r=httpx.post(
        main.url + "/v1/predict", content=slow_50_mb(), headers={"content-type": "image/png"}, timeout=30)))
    sender.start()
    health = [httpx.get(main.url + "/health", timeout=2).status_code for _ in range(3)]
    sender.join()
    assert health == [200, 200, 200]
    assert result["r"].status_code == 413 and "over the limit" in result["r"].json()["detail"]


def test_metrics_count_requests_latency_batches_and_errors(main):
    httpx.post(main.url + "/v1/predict", content=b"junk", headers={"content-type": "image/png"})
    text = httpx.get(main.url + "/metrics").text
    assert "# TYPE nnforge_request_duration_seconds histogram" in text
    assert 'nnforge_request_duration_seconds_bucket{path="/v1/predict",le="+Inf"}' in text
    assert 'nnforge_requests_total{path="/v1/predict",code="200"}' in text
    assert 'nnforge_errors_total{code="400"}' in text
    assert "nnforge_batch_size_count" in text and 'nnforge_model_info{name="resnet_tiny"' in text


# ------------------------------------------------------------------------------------------------------------
# reload


def test_reload_under_load_drops_no_request(main, run, images, expected):
    stop, answers = threading.Event(), []

    def client(i: int) -> None:
        with httpx.Client(base_url=main.url, timeout=30) as c:
            while not stop.is_set():
                p = images[i % len(images)]
                r = c.post("/v1/predict", files={"file": (p.name, p.read_bytes(), "image/png")})
                answers.append((p, r.status_code, r.json()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        to_torch = httpx.post(main.url + "/v1/reload", json={"backend": "torch"}, timeout=60)
        time.sleep(0.3)
        back = httpx.post(main.url + "/v1/reload", json={"run": str(run), "backend": "onnx"}, timeout=60)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert to_torch.status_code == 200 and to_torch.json()["backend"] == "torch", to_torch.text
    assert back.status_code == 200 and back.json()["previous_version"] == to_torch.json()["version"]
    assert [a for a in answers if a[1] != 200] == []
    for p, _, body in answers:
        same_answer(body["predictions"][0], expected[str(p)])
    assert {body["backend"] for _, _, body in answers} == {"onnx", "torch"}
    assert httpx.get(main.url + "/v1/model").json()["backend"] == "onnx"


def test_a_failed_reload_keeps_the_old_model(main, tmp_path):
    before = httpx.get(main.url + "/v1/model").json()["version"]
    r = httpx.post(main.url + "/v1/reload", json={"run": str(tmp_path / "missing")}, timeout=30)
    assert r.status_code == 422 and "still serving version " + before in r.json()["detail"]
    assert httpx.get(main.url + "/v1/model").json()["version"] == before
    assert httpx.post(main.url + "/v1/reload", json={"backend": "tflite"}).status_code == 422


# ------------------------------------------------------------------------------------------------------------
# tokens, queue, timeout, drain


def test_a_wrong_or_missing_token_gives_401(servers, images):
    g = servers["guarded"]
    assert httpx.get(g.url + "/health").status_code == 200  # liveness probes carry no token
    for method, path in [("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/model"), ("GET", "/docs"),
                         ("POST", "/v1/predict"), ("POST", "/v1/reload")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.request(method, g.url + path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(g.url + "/v1/model", headers=ok).status_code == 200
    # the token is checked before the body is read
    r = httpx.post(g.url + "/v1/predict", content=b"\0" * (20 << 20), headers={"content-type": "image/png"})
    assert r.status_code == 401


def test_a_full_queue_gives_503_not_a_hang_and_a_slow_answer_gives_504(servers, images):
    g, ok = servers["guarded"], {"Authorization": f"Bearer {TOKEN}"}
    data = images[0].read_bytes()

    def post():
        t0 = time.monotonic()
        r = httpx.post(g.url + "/v1/predict", content=data, headers={**ok, "content-type": "image/png"}, timeout=30)
        return r, time.monotonic() - t0

    def pending() -> str:
        return next(line for line in httpx.get(g.url + "/metrics", headers=ok).text.splitlines()
                    if line.startswith("nnforge_inputs_pending "))

    # alone, a request does not wait for a batch to fill (this server would wait 3 s for company)
    lone, seconds = post()
    assert lone.status_code == 200 and seconds < 1

    # a slow upload on its way makes the batcher wait for it: the next two requests sit in the queue of 2
    release = threading.Event()

    def slow_body():
        yield data[:10]
        release.wait(10)
        yield data[10:]

    slow = threading.Thread(target=lambda: httpx.post(
        g.url + "/v1/predict", content=slow_body(), headers={**ok, "content-type": "image/png"}, timeout=30))
    slow.start()
    try:
        time.sleep(0.2)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post) for _ in range(2)]
            end = time.monotonic() + 10
            while pending() != "nnforge_inputs_pending 2":
                assert time.monotonic() < end, "the two requests never reached the queue"
                time.sleep(0.02)
            full, seconds = post()
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert "busy" in full.json()["detail"] and seconds < 0.5
            for f in waiting:  # the 1 s request timeout ends their wait before the 3 s batch window does
                r, seconds = f.result()
                assert r.status_code == 504 and "no answer within 1s" in r.json()["detail"]
                assert 0.9 < seconds < 2.5
    finally:
        release.set()
        slow.join()
    assert pending() == "nnforge_inputs_pending 0"  # timed-out requests give their places back


def test_binding_beyond_loopback_needs_a_token(run, monkeypatch):
    monkeypatch.delenv("NNFORGE_TOKEN", raising=False)
    with pytest.raises(ValueError, match="NNFORGE_TOKEN"):
        nnforge.api.serve(run, host="0.0.0.0", port=free_port())  # refused before anything listens
    with pytest.raises(ValueError, match="NNFORGE_TOKEN"):
        nnforge.api.serve(run, host="my-server.example", port=free_port())
    assert not is_loopback("10.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")


def test_a_run_that_cannot_load_stops_the_server_with_the_reason(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="could not be loaded.*model.onnx"):
        nnforge.api.serve(broken, port=free_port(), backend="onnx")  # a real uvicorn, in this process
    assert time.monotonic() - t0 < 30


def test_a_reload_reaches_every_worker(servers, images, expected):
    w = servers["workers"]

    def reloads_by_worker(tries: int = 40) -> dict[int, int]:
        seen = {}
        for _ in range(tries):  # a fresh connection each time, so the kernel spreads them over the workers
            info = httpx.get(w.url + "/v1/model", headers={"Connection": "close"}).json()
            seen[info["worker_pid"]] = info["reloads"]
        return seen

    before = reloads_by_worker()
    assert len(before) == 2 and set(before.values()) == {0}, before
    assert httpx.post(w.url + "/v1/reload", timeout=60).status_code == 200
    end = time.monotonic() + 20
    while set((now := reloads_by_worker(10)).values()) != {1}:
        assert time.monotonic() < end, f"the other worker never followed the reload: {now}"
        time.sleep(0.2)
    r = httpx.post(w.url + "/v1/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"})
    same_answer(r.json()["predictions"][0], expected[str(images[0])])


def test_nothing_is_served_before_the_model_is_loaded(run):
    # the app without its lifespan, so the model never loads: readiness is what gates every answer
    app = create_app(ServeSettings(str(run)))

    async def ask() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nnforge") as c:
            return {"health": await c.get("/health"), "ready": await c.get("/ready"),
                    "model": await c.get("/v1/model"),
                    "predict": await c.post("/v1/predict", content=b"x", headers={"content-type": "image/png"})}

    answers = asyncio.run(ask())
    assert answers.pop("health").status_code == 200
    for name, r in answers.items():
        assert r.status_code == 503 and r.headers["retry-after"] == "1", name
        assert "loading" in r.json()["detail"]


def test_serving_an_export_needs_no_pytorch(run):
    code = ("import sys; from nnforge.deploy import server; from nnforge.deploy.engine import load_engine; "
            "e = load_engine(sys.argv[1]); e.warm(4); print(e.backend, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["onnx", "False"], out.stderr


# ------------------------------------------------------------------------------------------------------------
# a text run (these end with SIGTERM, so they come last)

TEXTS = ["a superb and funny film", "the plot was dull and tedious", "x", "brilliant"]


def test_text_runs_take_json_texts_and_give_predicts_answer(servers, text_run):
    t = servers["text"]
    want = nnforge.predict(text_run, TEXTS, top_k=2)
    answer = httpx.post(t.url + "/v1/predict", json={"texts": TEXTS}).json()
    assert httpx.get(t.url + "/v1/model").json()["input"]["shape"] == ["batch", "seq"]
    for got, w in zip(answer["predictions"], want, strict=True):
        assert got["labels"] == w["labels"]
        np.testing.assert_allclose(got["probs"], w["probs"], atol=1e-5)
    plain = httpx.post(t.url + "/v1/predict", content=TEXTS[0].encode(), headers={"content-type": "text/plain"})
    assert plain.json()["predictions"][0]["labels"] == want[0]["labels"]


@pytest.mark.parametrize(("kwargs", "status", "words"), [
    ({"json": {"texts": [""]}}, 400, "texts[0]: empty"),
    ({"json": {"texts": ["fine", 3]}}, 400, "texts[1]: expected a string"),
    ({"json": {"images": ["aGk="]}}, 400, '"texts"'),
    ({"content": b"\xff\xfe", "headers": {"content-type": "text/plain"}}, 400, "not UTF-8"),
    ({"files": {"file": ("a.png", b"x", "image/png")}}, 415, "text model"),
])
def test_bad_text_inputs_get_a_4xx(servers, kwargs, status, words):
    r = httpx.post(servers["text"].url + "/v1/predict", **kwargs)
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_sigterm_answers_requests_in_flight_then_exits(servers, text_run):
    t = servers["text"]
    body = json.dumps({"texts": TEXTS}).encode()
    half_sent, go_on, result = threading.Event(), threading.Event(), {}

    def trickle():  # half the body, then the rest once SIGTERM has been sent: the request spans the shutdown
        yield body[: len(body) // 2]
        half_sent.set()
        go_on.wait(10)
        yield body[len(body) // 2:]

    sender = threading.Thread(target=lambda: result.update(r=httpx.post(
        t.url + "/v1/predict", content=trickle(), headers={"content-type": "application/json"}, timeout=30)))
    sender.start()
    half_sent.wait(10)
    end = time.monotonic() + 10
    while "nnforge_requests_in_flight 2" not in httpx.get(t.url + "/metrics").text:  # the upload and this scrape
        assert time.monotonic() < end, "the upload never reached the server"
        time.sleep(0.02)
    t.terminate()
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no new connections while draining
        httpx.get(t.url + "/health", timeout=2)
    go_on.set()
    sender.join()
    assert result["r"].status_code == 200, result["r"].text
    want = nnforge.predict(text_run, TEXTS, top_k=2)
    assert [p["labels"] for p in result["r"].json()["predictions"]] == [w["labels"] for w in want]
    assert t.proc.wait(20) == 0
    assert "Shutting down" in t.output()
