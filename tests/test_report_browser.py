"""report.html in a real headless Chromium: it renders, shows its pictures, and loads nothing from outside.

Needs the Debian package `chromium` (apt-get install -y chromium); without it these tests fail, on purpose.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from nnforge.evaluation.metrics import write_evaluation
from nnforge.evaluation.report import SECTIONS, write_report

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_S = 20
CLASSES = ["T-shirt", "Trouser", "Bag & <Shoe>"]


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: these tests drive a real browser. Install it with "
                    "`apt-get update && apt-get install -y chromium`.")
    return CHROMIUM


def _run_chromium(exe: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(exe), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S}s: {' '.join(cmd)}")


def _console_errors(stderr: str) -> list[str]:
    # with --enable-logging=stderr, console messages come out as "...:CONSOLE:<line>] "<text>", source: ..."
    return [ln for ln in stderr.splitlines()
            if ":CONSOLE" in ln and ("Uncaught" in ln or "Failed to load" in ln)]


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.links: list[tuple[str, str]] = []  # (attribute, value) of every src / href

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        self.links += [(k, v or "") for k, v in attrs if k in ("src", "href")]


def _make_run(root: Path) -> Path:
    """A complete run folder: config, meta, data report, metrics for 4 epochs, and an eval on real PNGs."""
    run = root / "runs" / "image" / "exp1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": str(root / "data"), "model": "resnet_tiny", "epochs": 4, "batch_size": 64, "lr": 0.003,
         "optimizer": "adamw", "monitor": "val_acc", "seed": 0}, sort_keys=False))
    (run / "meta.json").write_text(json.dumps(
        {"task": "image", "model": "resnet_tiny", "classes": CLASSES, "kind": "image",
         "versions": {"nnforge": "0.1.0", "python": "3.11"}, "seed": 0, "created": "2025-01-02T03:04:05"}))
    (run / "data_report.json").write_text(json.dumps(
        {"counts": {s: {c: n for c in CLASSES} for s, n in (("train", 40), ("val", 6), ("test", 30))},
         "skipped": [{"path": "data/train/Bag/x.png", "reason": "cannot identify image file"}],
         "duplicates": [{"sha256": "00", "paths": ["data/train/Bag/a.png", "data/test/Bag/a.png"],
                         "splits": ["test", "train"], "labels": ["Bag & <Shoe>"], "leak": True}],
         "cache": "tensor"}))
    header = "epoch,step,lr,train_loss,train_acc,val_loss,val_acc,epoch_time_s,examples_per_s\n"
    rows = "".join(f"{e},{e * 10},{0.003 / e},{1.2 / e},{0.5 + 0.1 * e},{1.3 / e},{0.45 + 0.1 * e},2.5,900\n"
                   for e in range(1, 5))
    (run / "metrics.csv").write_text(header + rows)

    rng = np.random.default_rng(0)
    n = 90
    y = np.repeat(np.arange(3), n // 3)
    z = rng.normal(size=(n, 3))
    z[np.arange(n), y] += 1.0
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    img_dir = root / "data" / "test"
    img_dir.mkdir(parents=True)
    items = []
    for i in range(n):
        arr = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
        arr[6:22, 6:22] = (200 * (y[i] == 0), 200 * (y[i] == 1), 200 * (y[i] == 2))
        Image.fromarray(arr).save(img_dir / f"{i}.png")
        items.append(str(img_dir / f"{i}.png"))
    write_evaluation(run / "eval", y, p, CLASSES, items, kind="image")
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(_make_run(tmp_path_factory.mktemp("report")))


def test_report_dom_has_every_section_and_only_embedded_pngs(chromium, report, tmp_path):
    res = _run_chromium(chromium, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom",
                        report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console_errors(res.stderr) == []
    dom = _Dom()
    dom.feed(res.stdout)
    for sid, _ in SECTIONS:
        assert sid in dom.ids, f"section #{sid} missing from the rendered DOM"
    # curves, confusion matrix, per-class accuracy, reliability, and gallery thumbnails
    assert len(dom.imgs) >= 5 + 10
    for src in dom.imgs:
        assert src.startswith("data:image/png;base64,"), src[:80]
        try:
            png = base64.b64decode(src.split(",", 1)[1], validate=True)
        except binascii.Error as e:
            pytest.fail(f"img src is not valid base64: {e}")
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG"
            im.verify()
    external = [(k, v) for k, v in dom.links if not (v.startswith("data:") or v.startswith("#"))]
    assert external == [], "the page must not load anything from outside itself"
    assert "Bag &amp; &lt;Shoe&gt;" in res.stdout and "<Shoe>" not in res.stdout  # escaped, not markup
    assert "could not be built" not in res.stdout and "not available yet" not in res.stdout


def test_report_screenshot_is_not_blank(chromium, report, tmp_path):
    shot = tmp_path / "shot.png"
    res = _run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000",
                        report.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        colours = im.convert("RGB").getcolors(1 << 20)
    # a blank or unstyled page has a handful of colours; text, plots and thumbnails give thousands
    assert colours is not None and len(colours) > 2000, f"only {len(colours or [])} distinct colours"


def test_console_error_detection_works(chromium, tmp_path):
    # the check above is only worth something if a page that does throw is caught by it
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>throw new Error('boom')</script>")
    res = _run_chromium(chromium, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom",
                        bad.as_uri())
    assert any("boom" in ln for ln in _console_errors(res.stderr)), res.stderr[-2000:]
