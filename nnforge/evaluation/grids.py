"""Pictures of generated samples: a grid of images, and an animated GIF of grids over training.

    save_png(grid(images, columns=8), "samples/epoch_001.png")     # images: (N, H, W, C) uint8
    save_gif(sorted(Path("samples").glob("epoch_*.png")), "samples/progress.gif")

Files are written to a temporary name and renamed, so a viewer never opens half a picture.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = 128  # mid-grey between tiles: neither black nor white samples merge into it


def grid(images: np.ndarray, columns: int = 8, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, ...) picture, row by row; `scale` enlarges by a whole factor
    (nearest neighbour, so small images stay crisp)."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), BACKGROUND, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    return out


def _image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """(H, W, C) uint8 -> a PNG file, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _image(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_gif(frames: list[Path], path: str | Path, ms_per_frame: int = 400, hold_last_ms: int = 2000) -> Path | None:
    """An animated GIF of PNG files (e.g. one sample grid per epoch), looping, the last frame held longer."""
    if not frames:
        return None
    path = Path(path)
    images = []
    for f in frames:
        with Image.open(f) as im:
            images.append(im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE))
    tmp = path.with_name(f".{path.name}.tmp")
    durations = [ms_per_frame] * (len(images) - 1) + [hold_last_ms]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    os.replace(tmp, path)
    return path
