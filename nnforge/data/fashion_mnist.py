"""Write Fashion-MNIST (Debian package dataset-fashion-mnist) out once as a PNG class-folder tree.

    python -m nnforge.data.fashion_mnist data/fashion-mnist [--limit-per-class N]

gives data/fashion-mnist/{train,test}/<class>/<index>.png, the layout `nnforge train image --data` reads.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {magic:#x})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_tree(out: Path, source: Path = SOURCE, limit_per_class: int | None = None) -> Path:
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"{source}: Fashion-MNIST not found; install it with "
                                "`apt-get install dataset-fashion-mnist`")
    done = out / ".complete"
    if done.is_file() and done.read_text() == str(limit_per_class):
        print(f"{out}: already written", file=sys.stderr)
        return out
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        seen = np.zeros(len(CLASSES), dtype=int)
        for c in CLASSES:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            if limit_per_class is not None and seen[y] >= limit_per_class:
                continue
            seen[y] += 1
            Image.fromarray(img).save(out / split / CLASSES[y] / f"{i:05d}.png", optimize=False)
        print(f"{out / split}: {seen.sum()} images", file=sys.stderr)
    done.write_text(str(limit_per_class))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--limit-per-class", type=int, default=None)
    ap.add_argument("--source", type=Path, default=SOURCE, help="folder of the four idx .gz files")
    a = ap.parse_args()
    write_tree(a.out, source=a.source, limit_per_class=a.limit_per_class)
