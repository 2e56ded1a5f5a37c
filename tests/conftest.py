"""Shared fixtures: a small PNG class-folder tree with bad files in it, and a tiny trained image run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NNFORGE_CACHE", str(Path(__file__).parent.parent / ".cache" / "test-cache"))

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
