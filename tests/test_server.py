"""`nnforge serve` as a real process on 127.0.0.1, spoken to over HTTP: answers, limits, security, reload, drain.

    .venv/bin/pytest tests/test_server.py -q

Four servers start together (their start-up overlaps): `main` (an exported image run, ONNX Runtime, reload
allowed), `guarded` (a token and tight limits: a queue of 2, a 5 s timeout, batches that wait up to a minute for
requests on their way), `text` (an exported text run, no token and reload not allowed; the last test stops it with
SIGTERM mid-request) and `workers` (two processes, reload allowed).

No test orders events with a sleep or bounds how fast something was: each waits for the condition it needs (an
answer, a count in /metrics, a refused connection) up to a generous DEADLINE, so a busy machine makes the suite
slower, never red. The only clock a test reads is the server's own request timeout (504).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import DEADLINE, ROOT, Server, free_port, get, post, scrape, value, wait_for
from PIL import Image

import nnforge
import nnforge.api
from nnforge.deploy.server import create_app
from nnforge.deploy.settings import ServeSettings, is_loopback

TOKEN = "test-token-0123456789abcdef"
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
    slack = ("--timeout", str(DEADLINE))  # no 504 on a busy machine, except where a test wants one
    started = {
        "main": Server(run, logs / "main.log", "--max-body-mb", "2", "--max-pixels", "1000000",
                       "--max-wait-ms", "20", "--max-inputs", "8", "--allow-reload", *slack),
        "guarded": Server(run, logs / "guarded.log", "--max-queue", "2", "--max-wait-ms", "60000",
                          "--max-batch-size", "64", "--timeout", "5", env={"NNFORGE_TOKEN": TOKEN}),
        "text": Server(text_run, logs / "text.log", *slack),
        "workers": Server(run, logs / "workers.log", "--workers", "2", "--allow-reload", *slack),
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
    assert get(main.url + "/health").json() == {"status": "ok"}
    assert get(main.url + "/ready").json()["ready"] is True
    info = get(main.url + "/v1/model").json()
    card = json.loads((run / "model.json").read_text())
    assert info["backend"] == "onnx" and info["name"] == card["model"]
    assert info["classes"] == card["io"]["output"]["classes"] and info["output"]["kind"] == "probs"
    assert info["input"]["shape"][0] == "batch" and info["preprocessing"] == card["io"]["input"]
    assert info["version"] == card["sha256"][:12]
    assert "/v1/predict" in get(main.url + "/openapi.json").json()["paths"]
    docs = get(main.url + "/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "POST&nbsp;/v1/predict" in docs.text and "413" in docs.text  # the endpoints and their answers
    assert "<script" not in docs.text and "cdn" not in docs.text.lower()  # self-contained: works offline


def test_server_and_predict_give_the_same_answer_for_the_same_file(main, images, expected):
    path = images[0]
    data = path.read_bytes()
    multipart = post(main.url + "/v1/predict", files={"file": (path.name, data, "image/png")}).json()
    as_json = post(main.url + "/v1/predict", json={"images": [base64.b64encode(data).decode()]}).json()
    raw = post(main.url + "/v1/predict", content=data, headers={"content-type": "image/png"}).json()
    for answer in (multipart, as_json, raw):
        assert answer["backend"] == "onnx" and len(answer["predictions"]) == 1
        same_answer(answer["predictions"][0], expected[str(path)])
    top1 = post(main.url + "/v1/predict?top_k=1", content=data, headers={"content-type": "image/png"}).json()
    assert top1["predictions"][0]["labels"] == expected[str(path)]["labels"][:1]


def test_several_images_in_one_request_keep_their_order(main, images, expected):
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images[:5]]
    answer = post(main.url + "/v1/predict", files=files).json()
    for p, got in zip(images[:5], answer["predictions"], strict=True):
        same_answer(got, expected[str(p)])


def test_concurrent_clients_all_get_correct_answers_in_shared_batches(main, images, expected):
    def client(i: int) -> list[tuple[Path, dict]]:
        out = []
        with httpx.Client(base_url=main.url, timeout=DEADLINE) as c:
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
    m = scrape(main.url)  # 64 requests from 32 threads: some are bound to meet in the queue, more so on a busy machine
    assert value(m, "nnforge_batch_size_sum") > value(m, "nnforge_batch_size_count"), "no request shared a batch"


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
    r = post(main.url + "/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail and words in str(detail)


def test_mangled_images_never_get_a_500(main, images):
    rng = np.random.default_rng(0)
    good = images[0].read_bytes()
    codes = []
    with httpx.Client(base_url=main.url, timeout=DEADLINE) as c:
        for _ in range(40):  # flipped bytes, cut files, spliced headers: each a 200 or a 4xx with a message
            data = bytearray(good)
            for i in rng.integers(0, len(data), rng.integers(1, 20)):
                data[i] = rng.integers(0, 256)
            data = bytes(data[: rng.integers(8, len(data) + 1)])
            r = c.post("/v1/predict", content=data, headers={"content-type": "image/png"})
            codes.append(r.status_code)
            assert r.status_code == 200 or (r.status_code == 400 and r.json()["detail"]), r.text
    assert 400 in codes


def test_a_slow_upload_is_timed_out(servers):
    """A client that sends its body a byte at a time gets 504 once the request timeout (5 s here) is spent, and its
    connection closed; it does not hold the server's reading side forever."""
    g = servers["guarded"]
    with socket.create_connection(("127.0.0.1", g.port), timeout=DEADLINE) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100000\r\n\r\n")
        s.setblocking(False)
        answer, deadline = b"", time.monotonic() + DEADLINE
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            try:
                s.sendall(b"\0")  # a byte, then a wait: never the whole body
            except OSError:
                pass  # the server closed its side after answering
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                time.sleep(0.5)
    assert answer.startswith(b"HTTP/1.1 504"), answer


def test_a_50_mb_body_gets_413_before_it_is_sent_while_health_still_answers(main):
    # Content-Length announces it: the answer comes before a byte of the body is sent (a server that waited for the
    # body would never answer this client, which sends none)
    with socket.create_connection(("127.0.0.1", main.port), timeout=DEADLINE) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  b"Content-Length: %d\r\n\r\n" % (50 << 20))
        answer = b""
        while b"Content-Length says" not in answer and (chunk := s.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"Content-Length says" in answer, answer

    # chunked, no length: counted as it arrives; a sender stalled halfway holds up nobody else
    started, go_on, result = threading.Event(), threading.Event(), {}

    def stalled_50_mb():
        yield b"\0" * (1 << 20)
        started.set()
        go_on.wait(DEADLINE)
        for _ in range(49):
            yield b"\0" * (1 << 20)

    sender = threading.Thread(target=lambda: result.update(r=post(
        main.url + "/v1/predict", content=stalled_50_mb(), headers={"content-type": "image/png"})))
    sender.start()
    try:
        started.wait(DEADLINE)
        wait_for(lambda: value(scrape(main.url), "nnforge_requests_in_flight") == 2, "the upload to reach the server")
        health = [get(main.url + "/health").status_code for _ in range(3)]  # while the upload is in the server
    finally:
        go_on.set()
        sender.join()
    assert health == [200, 200, 200]
    assert result["r"].status_code == 413 and "over the limit" in result["r"].json()["detail"]


def test_metrics_count_requests_latency_batches_and_errors(main):
    before = scrape(main.url)
    post(main.url + "/v1/predict", content=b"junk", headers={"content-type": "image/png"})
    get(main.url + "/no/such/path")
    text = get(main.url + "/metrics").text
    assert "# TYPE nnforge_request_duration_seconds histogram" in text
    assert "# TYPE nnforge_requests_total counter" in text and "_created" not in text
    m = scrape(main.url)
    assert value(m, "nnforge_requests_total", path="/v1/predict", code="400") == \
        value(before, "nnforge_requests_total", path="/v1/predict", code="400") + 1
    assert value(m, "nnforge_errors_total", code="400") == value(before, "nnforge_errors_total", code="400") + 1
    assert value(m, "nnforge_requests_total", path="other", code="404") >= 1  # unknown paths share one label
    assert value(m, "nnforge_requests_total", path="/v1/predict", code="200") > 0
    assert value(m, "nnforge_request_duration_seconds_bucket", path="/v1/predict", le="+Inf") > 0
    assert value(m, "nnforge_batch_size_count") > 0 and value(m, "nnforge_inference_seconds_count") > 0
    assert value(m, "nnforge_queue_wait_seconds_count") == value(m, "nnforge_batch_size_sum")  # one per input
    assert value(m, "nnforge_ready") == 1 and value(m, "nnforge_inputs_pending") == 0
    info = {k[1]: v for k, v in m.items() if k[0] == "nnforge_model_info"}
    assert [dict(labels)["name"] for labels, v in info.items() if v == 1] == ["resnet_tiny"], info
    # where time goes besides the model: recorded by the server as it runs
    assert "# TYPE nnforge_gc_pause_seconds histogram" in text
    assert "# TYPE nnforge_event_loop_lag_seconds histogram" in text


# ------------------------------------------------------------------------------------------------------------
# reload


def test_reload_under_load_drops_no_request(main, run, images, expected):
    stop, answers = threading.Event(), []

    def client(i: int) -> None:
        with httpx.Client(base_url=main.url, timeout=DEADLINE) as c:
            while not stop.is_set():
                p = images[i % len(images)]
                r = c.post("/v1/predict", files={"file": (p.name, p.read_bytes(), "image/png")})
                answers.append((p, r.status_code, r.json()))

    def answer_from(backend: str, since: int):  # a condition: some answer after the first `since` came from it
        return lambda: any(body.get("backend") == backend for _, _, body in answers[since:])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:  # each reload starts once the model before it has answered, and the next once the new one has
        wait_for(answer_from("onnx", 0), "answers before the reload")
        to_torch = post(main.url + "/v1/reload", json={"backend": "torch"})
        wait_for(answer_from("torch", len(answers)), "answers from the reloaded model")
        back = post(main.url + "/v1/reload", json={"run": str(run), "backend": "onnx"})
        wait_for(answer_from("onnx", len(answers)), "answers after reloading back")
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
    assert get(main.url + "/v1/model").json()["backend"] == "onnx"
    m = scrape(main.url)
    assert value(m, "nnforge_reloads_total", result="ok") >= 2
    info = {dict(k[1])["backend"]: v for k, v in m.items() if k[0] == "nnforge_model_info"}
    assert info == {"onnx": 1, "torch": 0}, info  # the model served now, and the one before it


def test_without_a_token_reload_is_refused_unless_allowed_at_start(servers, text_run):
    t = servers["text"]  # no token, no --allow-reload
    before = get(t.url + "/v1/model").json()
    r = post(t.url + "/v1/reload", json={"run": str(text_run)})
    assert r.status_code == 403 and "--allow-reload" in r.json()["detail"] and "--token" in r.json()["detail"]
    assert get(t.url + "/v1/model").json() == before
    assert value(scrape(t.url), "nnforge_reloads_total", result="ok") == 0


def test_a_failed_reload_keeps_the_old_model(main, run, tmp_path):
    before = get(main.url + "/v1/model").json()["version"]
    r = post(main.url + "/v1/reload", json={"run": str(run.parent / "missing")})  # inside the allowed folder
    assert r.status_code == 422 and "still serving version " + before in r.json()["detail"]
    assert "missing" not in r.json()["detail"]  # the caller learns nothing about paths; the server log has it
    assert get(main.url + "/v1/model").json()["version"] == before
    assert post(main.url + "/v1/reload", json={"backend": "tflite"}).status_code == 400


def test_reload_is_confined_json_only_and_says_nothing_about_paths(main, run, tmp_path):
    """Reload loads runs under the served run's folder only; whether a path outside exists is not revealed; a
    cross-site form or text POST (no preflight needed) cannot trigger it, nor a Host a rebinding page would send."""
    before = get(main.url + "/v1/model").json()["version"]
    outside = [str(tmp_path), str(tmp_path / "nothing-here"), "/etc", "../../../etc"]
    answers = [post(main.url + "/v1/reload", json={"run": p}) for p in outside]
    assert {a.status_code for a in answers} == {403} and len({a.json()["detail"] for a in answers}) == 1
    for body in ({"content": b""}, {"content": b"run=/etc", "headers": {"content-type": "text/plain"}},
                 {"data": {"run": str(run)}}):
        assert post(main.url + "/v1/reload", **body).status_code == 415
    r = post(main.url + "/v1/reload", json={}, headers={"Host": "attacker.example:8000"})
    assert r.status_code == 421 and "--allowed-hosts" in r.json()["detail"]
    assert get(main.url + "/v1/model").json()["version"] == before
    assert value(scrape(main.url), "nnforge_reloads_total", result="refused") >= 4


def test_a_model_card_cannot_point_outside_its_run(run, tmp_path):
    from nnforge.deploy.artifacts import read_card

    exported_copy = tmp_path / "copy"
    shutil.copytree(run, exported_copy)
    card_path = exported_copy / "model.json"
    card = json.loads(card_path.read_text())
    for bad in ("/etc/passwd", "../../other/model.onnx", "sub/model.onnx", ".."):
        card_path.write_text(json.dumps({**card, "file": bad}))
        with pytest.raises(ValueError, match="must name a file in the run folder itself"):
            read_card(exported_copy)


# ------------------------------------------------------------------------------------------------------------
# tokens, queue, timeout, drain


def test_a_wrong_or_missing_token_gives_401(servers, images):
    g = servers["guarded"]
    assert get(g.url + "/health").status_code == 200  # liveness probes carry no token
    for method, path in [("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/model"), ("GET", "/docs"),
                         ("POST", "/v1/predict"), ("POST", "/v1/reload")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.request(method, g.url + path, headers=headers, timeout=DEADLINE)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert get(g.url + "/v1/model", headers=ok).status_code == 200
    # with a token, the token is what reload needs (this server was not started with --allow-reload)
    assert post(g.url + "/v1/reload", headers=ok, json={}).status_code == 200
    # the token is checked before the body is read
    r = post(g.url + "/v1/predict", content=b"\0" * (20 << 20), headers={"content-type": "image/png"})
    assert r.status_code == 401


def test_a_full_queue_gives_503_not_a_hang_and_a_slow_answer_gives_504(servers, images):
    g, ok = servers["guarded"], {"Authorization": f"Bearer {TOKEN}"}
    data = images[0].read_bytes()

    def predict(content=data) -> httpx.Response:
        return post(g.url + "/v1/predict", content=content, headers={**ok, "content-type": "image/png"})

    def metric(name: str) -> float:
        return value(scrape(g.url, ok), name)

    # alone, a request does not wait for company: this server's batches wait up to a minute for requests on their
    # way, past its 5 s request timeout, so a lone request that waited would get 504
    assert predict().status_code == 200

    # a slow upload on its way makes the batcher wait for it: the next two requests sit in the queue of 2
    release = threading.Event()

    def slow_body():
        yield data[:10]
        release.wait(DEADLINE)
        yield data[10:]

    slow = threading.Thread(target=lambda: predict(slow_body()))
    slow.start()
    try:
        wait_for(lambda: metric("nnforge_requests_in_flight") == 2, "the slow upload to reach the server")
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(predict) for _ in range(2)]
            wait_for(lambda: metric("nnforge_inputs_pending") == 2, "the two requests to reach the queue")
            full = predict()
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert "busy" in full.json()["detail"]
            for f in waiting:  # the request timeout ends their wait; the batch window would have lasted a minute
                r = f.result()
                assert r.status_code == 504 and "no answer within 5s" in r.json()["detail"]
    finally:
        release.set()
        slow.join()
    assert metric("nnforge_inputs_pending") == 0  # timed-out requests give their places back


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
    code = "import sys, nnforge.api; nnforge.api.serve(sys.argv[1], port=int(sys.argv[2]), backend='onnx')"
    out = subprocess.run([sys.executable, "-c", code, str(broken), str(free_port())], capture_output=True,
                         text=True, cwd=ROOT, timeout=DEADLINE)  # a real uvicorn, that must stop by itself
    assert out.returncode != 0
    assert re.search(r"RuntimeError: .*could not be loaded.*model\.onnx", out.stderr), out.stderr


# ------------------------------------------------------------------------------------------------------------
# several workers


def test_metrics_add_up_over_all_workers(servers, images):
    w = servers["workers"]
    data = images[0].read_bytes()

    def predict_and_say_who() -> int:  # one connection: /v1/model names the worker that answered the predict
        with httpx.Client(base_url=w.url, timeout=DEADLINE) as c:
            assert c.post("/v1/predict", content=data, headers={"content-type": "image/png"}).status_code == 200
            return c.get("/v1/model").json()["worker_pid"]

    def scrape_and_say_who() -> tuple[int, dict]:
        with httpx.Client(base_url=w.url, timeout=DEADLINE) as c:
            return c.get("/v1/model").json()["worker_pid"], scrape(w.url, client=c)

    before = scrape(w.url)
    served: Counter[int] = Counter()  # requests by worker: each on a fresh connection, which goes to either one
    wait_for(lambda: served.update([predict_and_say_who()]) or (len(served) == 2 and served.total() >= 20),
             "requests answered by each worker", every=0)
    scrapes: dict[int, dict] = {}
    wait_for(lambda: scrapes.update([scrape_and_say_who()]) or len(scrapes) == 2, "a scrape from each worker",
             every=0)
    n = served.total()
    for pid, m in scrapes.items():
        for name, labels in [("nnforge_requests_total", {"path": "/v1/predict", "code": "200"}),
                             ("nnforge_request_duration_seconds_count", {"path": "/v1/predict"}),
                             ("nnforge_batch_size_sum", {}), ("nnforge_queue_wait_seconds_count", {})]:
            assert value(m, name, **labels) - value(before, name, **labels) == n, (pid, name, served)
        assert value(m, "nnforge_requests_in_flight") == 1  # the scrape itself: the gauge sums the live workers
        assert value(m, "nnforge_ready") == 1 and value(m, "nnforge_inputs_pending") == 0
        assert [v for k, v in m.items() if k[0] == "nnforge_model_info"] == [1]


def test_a_reload_reaches_every_worker(servers, images, expected):
    w = servers["workers"]
    reloads: dict[int, int] = {}  # by worker

    def every_worker_has(n: int):
        def check() -> bool:  # a fresh connection each time, so the kernel spreads them over the workers
            info = get(w.url + "/v1/model", headers={"Connection": "close"}).json()
            reloads[info["worker_pid"]] = info["reloads"]
            return len(reloads) == 2 and set(reloads.values()) == {n}
        return check

    wait_for(every_worker_has(0), "both workers before the reload")
    assert post(w.url + "/v1/reload", json={}).status_code == 200
    wait_for(every_worker_has(1), "the other worker to follow the reload")
    r = post(w.url + "/v1/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"})
    same_answer(r.json()["predictions"][0], expected[str(images[0])])


def test_a_killed_workers_counts_stay_and_its_gauges_go(servers, images):
    w = servers["workers"]
    data = images[0].read_bytes()
    started, release, upload_error = threading.Event(), threading.Event(), []

    def stalled_body():
        yield data[:10]
        started.set()
        release.wait(DEADLINE)
        yield data[10:]

    victim_conn = httpx.Client(base_url=w.url, timeout=DEADLINE)  # one connection, so one worker: the victim
    assert victim_conn.post("/v1/predict", content=data, headers={"content-type": "image/png"}).status_code == 200
    victim = victim_conn.get("/v1/model").json()["worker_pid"]

    def upload() -> None:  # in flight in the victim when it dies
        try:
            victim_conn.post("/v1/predict", content=stalled_body(), headers={"content-type": "image/png"})
        except httpx.TransportError as err:
            upload_error.append(err)

    def pids_answering() -> set[int]:
        r = get(w.url + "/v1/model", headers={"Connection": "close"})
        return {r.json()["worker_pid"]} if r.status_code == 200 else set()

    survivor = wait_for(lambda: pids_answering() - {victim}, "the other worker to answer").pop()
    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        started.wait(DEADLINE)
        wait_for(lambda: value(scrape(w.url), "nnforge_requests_in_flight") == 2, "the upload to reach the victim")
        before = scrape(w.url)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: pids_answering() - {victim, survivor}, "uvicorn to start a worker in its place")
    finally:
        release.set()
        uploader.join()
        victim_conn.close()
    assert upload_error, "the upload to the killed worker got an answer"
    after = scrape(w.url)
    for name, labels in [("nnforge_requests_total", {"path": "/v1/predict", "code": "200"}),
                         ("nnforge_batch_size_sum", {})]:  # the dead worker's counts are still in the totals
        assert value(after, name, **labels) == value(before, name, **labels) > 0, name
    assert value(after, "nnforge_requests_in_flight") == 1  # the dead worker's upload no longer counts
    assert value(after, "nnforge_ready") == 1


def test_nothing_is_served_before_the_model_is_loaded(run):
    # the app without its lifespan, so the model never loads: readiness is what gates every answer
    app = create_app(ServeSettings(str(run)))

    async def ask() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
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
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, cwd=ROOT,
                         timeout=DEADLINE)
    assert out.stdout.split() == ["onnx", "False"], out.stderr


# ------------------------------------------------------------------------------------------------------------
# a text run (these end with SIGTERM, so they come last)

TEXTS = ["a superb and funny film", "the plot was dull and tedious", "x", "brilliant"]


def test_text_runs_take_json_texts_and_give_predicts_answer(servers, text_run):
    t = servers["text"]
    want = nnforge.predict(text_run, TEXTS, top_k=2)
    answer = post(t.url + "/v1/predict", json={"texts": TEXTS}).json()
    assert get(t.url + "/v1/model").json()["input"]["shape"] == ["batch", "seq"]
    for got, w in zip(answer["predictions"], want, strict=True):
        assert got["labels"] == w["labels"]
        np.testing.assert_allclose(got["probs"], w["probs"], atol=1e-5)
    plain = post(t.url + "/v1/predict", content=TEXTS[0].encode(), headers={"content-type": "text/plain"})
    assert plain.json()["predictions"][0]["labels"] == want[0]["labels"]


@pytest.mark.parametrize(("kwargs", "status", "words"), [
    ({"json": {"texts": [""]}}, 400, "texts[0]: empty"),
    ({"json": {"texts": ["fine", 3]}}, 400, "texts[1]: expected a string"),
    ({"json": {"images": ["aGk="]}}, 400, '"texts"'),
    ({"content": b"\xff\xfe", "headers": {"content-type": "text/plain"}}, 400, "not UTF-8"),
    ({"files": {"file": ("a.png", b"x", "image/png")}}, 415, "text model"),
])
def test_bad_text_inputs_get_a_4xx(servers, kwargs, status, words):
    r = post(servers["text"].url + "/v1/predict", **kwargs)
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_sigterm_answers_requests_in_flight_then_exits(servers, text_run):
    t = servers["text"]
    body = json.dumps({"texts": TEXTS}).encode()
    half_sent, go_on, result = threading.Event(), threading.Event(), {}

    def trickle():  # half the body, then the rest once SIGTERM has been sent: the request spans the shutdown
        yield body[: len(body) // 2]
        half_sent.set()
        go_on.wait(DEADLINE)
        yield body[len(body) // 2:]

    def refused() -> bool:
        try:
            get(t.url + "/health")
        except httpx.TransportError:
            return True
        return False

    sender = threading.Thread(target=lambda: result.update(r=post(
        t.url + "/v1/predict", content=trickle(), headers={"content-type": "application/json"})))
    sender.start()
    try:
        half_sent.wait(DEADLINE)
        wait_for(lambda: value(scrape(t.url), "nnforge_requests_in_flight") == 2,  # the upload and this scrape
                 "the upload to reach the server")
        t.terminate()
        wait_for(refused, "the server to refuse new connections while it drains")
    finally:
        go_on.set()
        sender.join()
    assert result["r"].status_code == 200, result["r"].text
    want = nnforge.predict(text_run, TEXTS, top_k=2)
    assert [p["labels"] for p in result["r"].json()["predictions"]] == [w["labels"] for w in want]
    assert t.proc.wait(DEADLINE) == 0
    assert "Shutting down" in t.output()
