"""The doctor's pictures: one training batch as the model sees it, and the learning-rate range test curve.

The batch grid is drawn pixel by pixel with Pillow (no resampling but an integer nearest-neighbour zoom), so every
tile shows exactly the values the model received, un-normalised back to 0..255.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_STRIP = 14  # px of caption under each tile
GRID_MAX = 64  # examples shown; more make tiles too small to judge


def unnormalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Normalised float (B, C, H, W) -> uint8 (B, C, H, W): the inverse of data.images.normalise."""
    u = (x.detach().float().cpu() * std.view(1, -1, 1, 1).cpu() + mean.view(1, -1, 1, 1).cpu()) * 255
    return u.round().clamp(0, 255).to(torch.uint8).numpy()


def batch_grid(images: np.ndarray, labels: list[str], path: Path) -> dict:
    """Save uint8 (B, C, H, W) images as a captioned grid; returns the layout (to find a tile again)."""
    images, labels = images[:GRID_MAX], labels[:GRID_MAX]
    b, c, h, w = images.shape
    zoom = max(1, min(8, math.ceil(64 / max(h, w))))  # small images are blown up to ~64 px for the eye
    cols = min(8, b)
    rows = math.ceil(b / cols)
    tw, th = w * zoom, h * zoom + LABEL_STRIP
    pad = 2
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in range(b):
        tile = images[i].transpose(1, 2, 0)  # (H, W, C)
        tile = np.repeat(tile, 3, axis=2) if c == 1 else tile[:, :, :3]
        tile = tile.repeat(zoom, axis=0).repeat(zoom, axis=1)
        x0, y0 = pad + (i % cols) * (tw + pad), pad + (i // cols) * (th + pad)
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (x0, y0))
        text = labels[i]
        while text and draw.textlength(text, font=font) > tw - 2:
            text = text[:-1]
        draw.text((x0 + 1, y0 + h * zoom + 1), text, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return {"file": path.name, "shown": b, "cols": cols, "zoom": zoom, "pad": pad, "tile_w": tw, "tile_h": th,
            "labels": labels}


def grid_tile(grid: np.ndarray, layout: dict, i: int, height: int) -> np.ndarray:
    """Tile i of a saved grid (H*zoom, W*zoom, 3) back at its original resolution: (H, W, 3) uint8."""
    cols, pad, tw, th, z = layout["cols"], layout["pad"], layout["tile_w"], layout["tile_h"], layout["zoom"]
    x0, y0 = pad + (i % cols) * (tw + pad), pad + (i // cols) * (th + pad)
    return grid[y0:y0 + height * z:z, x0:x0 + tw:z]


def text_batch_table(rows: list[dict], path: Path) -> dict:
    """A text batch as a TSV table: label, the tokens the model gets (decoded), and the source text if known."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["label", "tokens", "decoded"], delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return {"file": path.name, "shown": len(rows), "labels": [r["label"] for r in rows]}


def lr_range_plot(lrs: list[float], losses: list[float], smooth: list[float], marks: dict[str, float],
                  path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(lrs, losses, color="0.75", lw=1, label="loss per step")
    ax.plot(lrs, smooth, color="C0", lw=2, label="smoothed")
    colors = {"suggested": "C2", "min loss": "C3", "steepest": "C1", "configured": "k"}
    for name, lr in marks.items():
        ax.axvline(lr, color=colors.get(name, "C4"), ls="--", lw=1, label=f"{name} {lr:.2g}")
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        lo, first = min(finite), finite[0]
        ax.set_ylim(lo - 0.05 * abs(lo), max(first, lo) * 1.6 + 1e-3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("learning-rate range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
