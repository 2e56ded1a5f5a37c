"""The labelling page (nnforge label): its API against a real server on 127.0.0.1 over real capture stores, and the
page itself in headless Chromium, driven by real key events through the DevTools protocol.

Needs the Debian package `chromium` (apt-get install -y chromium); without it the browser test fails, on purpose.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from cdp import Browser
from conftest import CLASSES, make_png_tree

from nnforge.data.images import find_samples
from nnforge.data.text import read_file
from nnforge.deploy.capture import Capturer, CaptureStore
from nnforge.loop import _label_page
from nnforge.loop.label import create_app, run

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "a-test-token-of-enough-length"
TEXT_CLASSES = ["complaint", "praise", "question"]
TEXTS = ["the parcel never arrived", "<img src=x onerror=alert(1)> & <b>bold</b>", "how do I reset my password?",
         "great service, thank you", "wrong size again", "is there a shop in Leeds?"]
MODEL = {"model": "shapes", "version": "3", "run": "runs/image/exp1"}


def _probs(n: int, k: int, confident: int = 0) -> np.ndarray:
    """Row i's top guess is class i % k at 0.5 (captured: below the 0.6 threshold); the last `confident` rows are
    sure (0.9) and captured only as the random sample."""
    p = np.full((n, k), 0.2 / max(k - 2, 1) if k > 2 else 0.0)
    for i in range(n):
        top, second = i % k, (i + 1) % k
        if i >= n - confident:
            p[i] = 0.1 / (k - 1)
            p[i, top] = 0.9
        else:
            p[i, top], p[i, second] = 0.5, 0.3
    return p / p.sum(1, keepdims=True)


def _capture(folder: Path, items: list, classes: list[str], confident: int = 0) -> CaptureStore:
    cap = Capturer(folder, sample=1.0, seed=0)  # sample=1: the confident rows come in as "sample"
    cap.offer(items, _probs(len(items), len(classes), confident), classes, MODEL)
    cap.close()
    return CaptureStore(folder)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[Path]:
    root = make_png_tree(tmp_path_factory.mktemp("label-pngs"), per_class=3, bad_files=False)
    return sorted(root.rglob("*.png"))


@pytest.fixture
def image_store(tmp_path, pngs) -> CaptureStore:
    return _capture(tmp_path / "captures", [(p.name, p.read_bytes()) for p in pngs], CLASSES, confident=2)


@pytest.fixture
def text_store(tmp_path) -> CaptureStore:
    return _capture(tmp_path / "text-captures", [(f"text{i}", t) for i, t in enumerate(TEXTS)], TEXT_CLASSES)


class Server:
    """The label app under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, store: CaptureStore, **kw):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(store, **kw), log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the label server did not start within 10s")
            time.sleep(0.02)
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def label(self, item_id: int, label: str | None = None, status: str | None = None) -> httpx.Response:
        body = {"id": item_id, **({"label": label} if label else {}), **({"status": status} if status else {})}
        return self.http.post("/api/label", json=body)


def _labels(store: CaptureStore) -> dict[int, tuple[str, str | None]]:
    return {it["id"]: (it["status"], it["label"]) for it in store.items()}


# ---------------------------------------------------------------------------------------------------------------
# the API


def test_label_skip_unclear_and_undo_through_the_api(image_store, pngs):
    with Server(image_store, by="tester") as s:
        listing = s.http.get("/api/items").json()
        assert listing["classes"] == CLASSES
        ids = [it["id"] for it in listing["items"]]
        assert ids == list(range(1, len(pngs) + 1)) and listing["counts"]["new"] == len(pngs)
        assert {it["reason"] for it in listing["items"]} == {"low_confidence", "sample"}

        item = s.http.get("/api/item/1").json()
        assert item["prediction"] == CLASSES[0] and item["top"][0] == [CLASSES[0], pytest.approx(0.5, abs=1e-3)]
        assert item["reason"] == "low_confidence" and item["version"] == "3"
        assert "path" not in item and "file" not in item  # the page never sees where the file lies
        img = s.http.get(item["content"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.headers["x-content-type-options"] == "nosniff" and img.content == pngs[0].read_bytes()

        r = s.label(1, CLASSES[1])
        assert r.status_code == 200, r.text
        assert r.json()["item"]["label"] == CLASSES[1] and r.json()["counts"]["labelled"] == 1
        assert s.label(2, status="skipped").status_code == 200
        assert s.label(3, status="unclear").status_code == 200
        got = image_store.get(1)
        assert (got["status"], got["label"], got["labelled_by"]) == ("labelled", CLASSES[1], "tester")
        assert _labels(image_store)[2] == ("skipped", None) and _labels(image_store)[3] == ("unclear", None)

        assert s.label(1, status="new").status_code == 200  # undo
        assert _labels(image_store)[1] == ("new", None)
        stats = s.http.get("/api/stats").json()
        assert (stats["labelled"], stats["skipped"], stats["unclear"], stats["left"]) == (0, 1, 1, len(pngs) - 2)
        assert [it["id"] for it in s.http.get("/api/items?status=skipped").json()["items"]] == [2]
        assert [it["id"] for it in s.http.get("/api/items?status=unclear").json()["items"]] == [3]


def test_api_errors_are_clear_4xx(image_store):
    with Server(image_store) as s:
        for path in ("/api/item/999", "/api/item/999/content"):
            r = s.http.get(path)
            assert r.status_code == 404 and "999" in r.json()["detail"], (path, r.text)
        r = s.label(999, CLASSES[0])
        assert r.status_code == 404 and "999" in r.json()["detail"]
        r = s.label(1, "dog")
        assert r.status_code == 422 and "'dog'" in r.json()["detail"]
        assert all(c in r.json()["detail"] for c in CLASSES), r.text
        r = s.label(1, status="maybe")
        assert r.status_code == 422 and "skipped" in r.json()["detail"]
        assert s.label(1).status_code == 422  # a label is needed to label
        r = s.http.post("/api/label", data={"id": "1", "label": CLASSES[0]})  # a form, as another site could send
        assert r.status_code == 415
        r = s.http.post("/api/label", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["detail"]
        assert s.http.get("/api/items?status=bogus").status_code == 422
        assert s.http.post("/api/import", content=b"path,label\n", headers={"content-type": "text/plain"}).status_code \
            == 415
        assert _labels(image_store)[1] == ("new", None)  # nothing above wrote anything


def test_export_then_import_into_a_fresh_copy_gives_the_same_labels(image_store, tmp_path):
    fresh = tmp_path / "fresh-copy"
    shutil.copytree(image_store.folder, fresh)
    wanted = {1: CLASSES[1], 2: CLASSES[0], 5: CLASSES[2], 6: CLASSES[2]}
    with Server(image_store) as s:
        for item_id, label in wanted.items():
            assert s.label(item_id, label).status_code == 200
        assert s.label(3, status="skipped").status_code == 200
        absolute = s.http.get("/api/export")
        relative = s.http.get("/api/export?paths=relative")
    assert absolute.status_code == 200 and absolute.headers["content-type"].startswith("text/csv")
    assert 'filename="labels.csv"' in absolute.headers["content-disposition"]
    assert absolute.text.splitlines()[0] == "path,label,split"

    # `nnforge train image --data labels.csv` reads the download from anywhere: absolute paths, the right labels
    elsewhere = tmp_path / "downloads" / "labels.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_text(absolute.text)
    samples = find_samples(elsewhere)
    by_path = {str(Path(image_store.get(i)["path"]).resolve()): y for i, y in wanted.items()}
    assert {s.path: s.label for s in samples} == by_path and {s.split for s in samples} == {"train"}

    # the relative form moves with the folder: imported into the unlabelled copy it gives the same labels
    assert all(line.split(",")[0].startswith("items/") for line in relative.text.splitlines()[1:])
    copy = CaptureStore(fresh)
    assert copy.counts()["labelled"] == 0
    with Server(copy, by="importer") as s:
        r = s.http.post("/api/import?name=labels.csv", content=relative.text.encode(),
                        headers={"content-type": "text/csv"})
        assert r.status_code == 200 and r.json()["imported"] == len(wanted), r.text
        assert {i: y for i, (st, y) in _labels(copy).items() if st == "labelled"} == wanted
        assert copy.get(1)["labelled_by"] == "importer"

        # an error names the file and the row, and writes nothing
        bad = relative.text.splitlines()
        bad[2] = bad[2].replace(bad[2].split(",")[1], "dog")
        r = s.http.post("/api/import?name=mine.csv", content="\n".join(bad).encode(),
                        headers={"content-type": "text/csv"})
        assert r.status_code == 400 and "mine.csv:3" in r.json()["detail"] and "'dog'" in r.json()["detail"], r.text
        assert str(fresh) not in r.json()["detail"]  # the temporary file's name is not shown


def test_text_store_labels_exports_and_imports(text_store, tmp_path):
    fresh = tmp_path / "fresh-texts"
    shutil.copytree(text_store.folder, fresh)
    with Server(text_store) as s:
        item = s.http.get("/api/item/2").json()
        assert item["kind"] == "text" and item["text"] == TEXTS[1]  # as captured; the page inserts it as text
        raw = s.http.get("/api/item/2/content")
        assert raw.headers["content-type"].startswith("text/plain") and raw.text == TEXTS[1]
        for item_id, label in ((1, "complaint"), (2, "question"), (4, "praise")):
            assert s.label(item_id, label).status_code == 200
        exported = s.http.get("/api/export").text
    csv_path = tmp_path / "texts.csv"
    csv_path.write_text(exported)
    rows, skipped, _ = read_file(csv_path, "text", "label")  # what `nnforge train text --data texts.csv` reads
    assert not skipped and {(r.text, r.label) for r in rows} == {(TEXTS[0], "complaint"), (TEXTS[1], "question"),
                                                                 (TEXTS[3], "praise")}
    copy = CaptureStore(fresh)
    with Server(copy) as s:
        r = s.http.post("/api/import", content=exported.encode(), headers={"content-type": "text/csv"})
        assert r.status_code == 200 and r.json()["imported"] == 3
    assert _labels(copy) == _labels(text_store)


def test_token_host_check_and_security_headers(image_store):
    with Server(image_store, token=TOKEN) as s:
        page = s.http.get("/")  # the page holds no data: it opens without the token, then sends it
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        for path in ("/api/stats", "/api/items", "/api/item/1", "/api/item/1/content", "/api/export"):
            r = s.http.get(path)
            assert r.status_code == 401 and "default-src 'self'" in r.headers["content-security-policy"], path
        assert s.http.get("/api/stats", headers={"authorization": "Bearer wrong"}).status_code == 401
        good = {"authorization": f"Bearer {TOKEN}"}
        assert s.http.get("/api/stats", headers=good).status_code == 200
        # DNS rebinding: a name that points at 127.0.0.1 from another site is not served
        assert s.http.get("/api/stats", headers={**good, "host": "evil.example"}).status_code == 421
    # nothing from another origin, and stored strings never go in as markup
    for asset in (_label_page.HTML, _label_page.CSS, _label_page.JS):
        assert "http://" not in asset and "https://" not in asset and "//cdn" not in asset
    assert "innerHTML" not in _label_page.JS and "insertAdjacentHTML" not in _label_page.JS


def test_a_public_address_needs_a_token(image_store):
    from nnforge.cli import COMMANDS, build_parser

    with pytest.raises(ValueError, match="--token"):
        run(image_store.folder, host="0.0.0.0")
    with pytest.raises(ValueError, match="--token"):
        create_app(image_store, host="192.168.1.10")
    create_app(image_store, host="0.0.0.0", token=TOKEN)  # fine with one (not bound here)
    a = build_parser().parse_args(["label", str(image_store.folder)])
    assert (a.host, a.port, a.by, a.token) == ("127.0.0.1", 8001, None, None) and "label" in COMMANDS


def test_nnforge_label_command_serves_the_store(image_store, tmp_path, capsys):
    from nnforge.cli import main

    assert main(["label", str(tmp_path / "nothing")]) == 2
    assert "no capture.db" in capsys.readouterr().err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nnforge.cli", "label", str(image_store.folder), "--port",
                             str(port), "--by", "cli-user"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if http.get("/api/stats").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"`nnforge label` did not answer within 20s: {proc.poll()}")
                time.sleep(0.1)
            assert http.post("/api/label", json={"id": 4, "label": CLASSES[2]}).status_code == 200
        assert image_store.get(4)["labelled_by"] == "cli-user"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
    assert f"open http://127.0.0.1:{port}/" in out, out


# ---------------------------------------------------------------------------------------------------------------
# the page in a real browser


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: this test drives a real browser. Install it with "
                    "`apt-get update && apt-get install -y chromium` (scripts/system-packages.sh does in CI).")
    return CHROMIUM


STATE = "({shown: document.body.dataset.shown, message: document.getElementById('message').textContent})"


def test_page_labels_by_keyboard_in_chromium(chromium, image_store, text_store, tmp_path):
    top3 = image_store.get(3)["top"][0][0]
    assert top3 != CLASSES[1]  # so that Enter is seen to take the model's guess, not repeat the "2"
    with Server(image_store, by="keyboard") as s, Server(text_store) as t, Browser(chromium, tmp_path / "p") as b:
        page = b.open(s.url + "/")
        page.wait_for("document.body.dataset.shown === '1'", what="item 1 on the page", state=STATE)
        assert page.evaluate("document.getElementById('image').naturalWidth") > 0, "the image did not load"
        buttons = page.evaluate("[...document.querySelectorAll('#buttons button')].map(b => b.textContent)")
        assert buttons == [f"{i + 1} {c}" for i, c in enumerate(CLASSES)]
        assert f"left {len(image_store.items())}" in page.evaluate("document.getElementById('counter').textContent")

        page.press("2")
        page.wait_for("document.body.dataset.shown === '2'", what="item 2 after pressing 2", state=STATE)
        page.press("s")
        page.wait_for("document.body.dataset.shown === '3'", what="item 3 after pressing s", state=STATE)
        assert page.evaluate("document.getElementById('image').naturalWidth") > 0
        page.press("Enter")
        page.wait_for("document.body.dataset.shown === '4'", what="item 4 after pressing Enter", state=STATE)
        assert (image_store.get(1)["status"], image_store.get(1)["label"]) == ("labelled", CLASSES[1])
        assert image_store.get(1)["labelled_by"] == "keyboard"
        assert image_store.get(2)["status"] == "skipped"
        assert (image_store.get(3)["status"], image_store.get(3)["label"]) == ("labelled", top3)
        page.wait_for("document.getElementById('counter').textContent.includes('labelled 2 · skipped 1')",
                      what="the counter", state="document.getElementById('counter').textContent")

        page.press("z")  # undo: item 3 is new again and back on screen
        page.wait_for("document.body.dataset.shown === '3'", what="item 3 after undo", state=STATE)
        assert (image_store.get(3)["status"], image_store.get(3)["label"]) == ("new", None)

        # a text goes in as text: the markup in it is shown, not run
        text_page = b.open(t.url + "/")
        text_page.wait_for("document.body.dataset.shown === '1'", what="text item 1", state=STATE)
        text_page.press("ArrowRight")
        text_page.wait_for("document.body.dataset.shown === '2'", what="text item 2", state=STATE)
        assert text_page.evaluate("document.getElementById('text').textContent") == TEXTS[1]
        assert text_page.evaluate("document.querySelectorAll('#text *').length") == 0

        # with a token: the page takes it from its address, drops it from there, and sends it with every request
        with Server(image_store, token=TOKEN) as guarded:
            token_page = b.open(guarded.url + f"/?token={TOKEN}")
            token_page.wait_for("document.body.dataset.shown === '3'", what="the first new item behind a token",
                                state=STATE)
            assert token_page.evaluate("document.getElementById('image').naturalWidth") > 0
            assert TOKEN not in token_page.evaluate("location.href")

        b.pump(0.2)
        assert page.problems() == [] and text_page.problems() == [] and token_page.problems() == []
        assert any(u.startswith(s.url + "/api/item/1/content") for u in page.requests()), page.requests()

        # the checks above are worth something only if they catch a page that throws or reaches out
        text_page.evaluate("setTimeout(() => { throw new Error('boom') }); new Image().src = 'http://192.0.2.1/x.png'")
        b.pump(0.3)
        caught = " ".join(text_page.problems())
        assert "boom" in caught and "request left 127.0.0.1: http://192.0.2.1/x.png" in caught, caught
