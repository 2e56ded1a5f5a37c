"""Shared fixtures: a small PNG class-folder tree with bad files in it, and a tiny trained image run; and the
helpers that start `nnforge serve` as a real process and wait for what a test needs (Server, wait_for, scrape)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

os.environ.setdefault("NNFORGE_CACHE", str(Path(__file__).parent.parent / ".cache" / "test-cache"))
ROOT = Path(__file__).resolve().parent.parent

CLASSES = ["circle", "cross", "stripes"]


def draw(cls: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A grayscale picture whose class is plain to see, with noise so no two are identical."""
    img = rng.integers(0, 60, (size, size)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-1.5, 1.5, 2)
    if cls == "circle":
        img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size / 3) ** 2] = 220
    elif cls == "cross":
        img[np.abs(yy - c[0]) < 2] = 220
        img[:, np.abs(xx[0] - c[1]) < 2] = 220
    else:
        img[(yy // 3) % 2 == 0] = 220
    return img


def make_png_tree(root: Path, per_class: int = 16, size: int = 16, seed: int = 0, bad_files: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(cls, rng, size)).save(d / f"{i:03d}.png")
    if bad_files:
        (root / "circle" / "zero.png").write_bytes(b"")
        (root / "cross" / "notes.txt").write_text("not an image")
        good = (root / "stripes" / "000.png").read_bytes()
        (root / "stripes" / "truncated.png").write_bytes(good[: len(good) // 2])
        (root / "circle" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200)))
    return root


@pytest.fixture(scope="session")
def png_tree(tmp_path_factory) -> Path:
    return make_png_tree(tmp_path_factory.mktemp("pngs") / "shapes")


@pytest.fixture(scope="session")
def trained_run(png_tree, tmp_path_factory) -> Path:
    """A tiny image run (a few seconds on the CPU), shared by tests that need a trained model."""
    import nnforge

    out = tmp_path_factory.mktemp("runs")
    run = nnforge.train("image", data=str(png_tree), epochs=3, batch_size=8, out=str(out), name="tiny",
                        workers=1, precision="fp32", lr=3e-3, val_split=0.2, test_split=0.2)
    return run.path


def builtin_models(input: str) -> list[str]:
    """Registered classifiers that ship with nnforge (tests may register their own, e.g. the doctor's faults)."""
    from nnforge.models import get_entry, list_models

    return [n for n in list_models(task="classify", input=input) if get_entry(n).fn.__module__.startswith("nnforge.")]


# ------------------------------------------------------------------------------------------------------------
# a real server process (tests/test_server.py, tests/test_capture_serve.py)

DEADLINE = 120.0  # seconds to wait for anything: generous, since a condition that holds ends the wait at once


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=DEADLINE, **kwargs)


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=DEADLINE, **kwargs)


def wait_for(condition, what, every: float = 0.02):
    """condition()'s first truthy value, polled every `every` seconds; the test fails after DEADLINE, saying `what`
    (a string, or a function that returns one)."""
    end = time.monotonic() + DEADLINE
    while not (value := condition()):
        if time.monotonic() > end:
            pytest.fail(f"waited {DEADLINE:g}s for {what() if callable(what) else what}")
        time.sleep(every)
    return value


def scrape(url: str, headers: dict | None = None, client: httpx.Client | None = None) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted label pairs): value}."""
    text = (client.get("/metrics", headers=headers) if client else get(url + "/metrics", headers=headers)).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict[tuple, float], name: str, **labels: str) -> float:
    """One sample; 0 when absent (a counter no request has touched yet)."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


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

    def wait_ready(self, headers: dict | None = None) -> Server:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return get(self.url + "/ready", headers=headers).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, lambda: f"the server to be ready; its output so far:\n{self.output()}", every=0.1)
        return self

    def terminate(self) -> None:
        if self.proc.poll() is None and not self.terminated:  # once: a second SIGTERM during exit would kill it
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self) -> int:
        self.terminate()
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server ignored SIGTERM for {DEADLINE:g}s:\n{self.output()}")


@contextlib.contextmanager
def serving_in_thread(run, **settings):
    """`nnforge serve RUN` on a free 127.0.0.1 port in this process (uvicorn on a thread): the URL, once /ready."""
    import uvicorn

    from nnforge.deploy.server import create_app
    from nnforge.deploy.settings import ServeSettings

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServeSettings(str(run), port=port, **settings)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), "the server's /ready")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready").status_code == 200
    except httpx.TransportError:
        return False
