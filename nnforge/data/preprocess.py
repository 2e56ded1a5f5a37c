"""From a run's input spec to model inputs: the one preprocessing path for evaluate, predict, export and serve.

    pre = build_preprocessor(meta["spec"], run_dir)
    x = pre.batch([pre.decode(open("shoe.png", "rb").read())])   # float32 (1, C, H, W), normalised
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnforge.data.imageio import MAX_PIXELS, ImageError, decode_image


class InputError(ValueError):
    """One input cannot be turned into a model input; the message says why (HTTP 4xx, CLI error)."""


class ImagePreprocessor:
    kind = "image"

    def __init__(self, spec: dict, max_pixels: int = MAX_PIXELS):
        self.channels, self.size = int(spec["channels"]), int(spec["size"])
        self.mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
        self.max_pixels = max_pixels

    def decode(self, data: bytes | str) -> np.ndarray:
        """Encoded image bytes -> float32 (C, S, S), normalised like the training data."""
        if isinstance(data, str):
            raise InputError("expected image bytes, got text")
        try:
            arr = decode_image(data, self.channels, self.size, self.max_pixels)
        except ImageError as err:
            raise InputError(str(err)) from None
        return (arr.astype(np.float32) / 255.0 - self.mean) / self.std

    def load(self, item: str | Path) -> np.ndarray:
        try:
            data = Path(item).read_bytes()
        except OSError as err:
            raise InputError(f"{item}: unreadable ({err.strerror})") from None
        try:
            return self.decode(data)
        except InputError as err:
            raise InputError(f"{item}: {err}") from None

    def batch(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays).astype(np.float32)

    def example(self, n: int = 2) -> np.ndarray:
        """A dummy batch with the model's input shape (export tracing)."""
        return np.zeros((n, self.channels, self.size, self.size), dtype=np.float32)


def build_preprocessor(spec: dict, run_dir: str | Path | None = None):
    kind = spec.get("kind")
    if kind == "image":
        return ImagePreprocessor(spec)
    if kind == "text":
        from nnforge.data.text import TextPreprocessor

        return TextPreprocessor(spec, Path(run_dir) if run_dir else None)
    raise ValueError(f"unknown input kind {kind!r} in the run's spec; expected image or text")
