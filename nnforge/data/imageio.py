"""Reading images: one checked decode path shared by the tensor cache, `predict` and the server.

    arr = decode_image(open("shoe.png", "rb").read(), channels=1, size=28)   # uint8 (1, 28, 28)

Every failure is an ImageError with a reason a person can act on; source files are only ever read.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Pillow's decompression-bomb limit (about 89 Mpx): a larger image is refused, not decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


@dataclass(frozen=True)
class ImageCheck:
    path: str
    ok: bool
    reason: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""


def _open(data: bytes, min_size: int = 1, max_pixels: int = MAX_PIXELS) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in ALLOWED_FORMATS:
                raise ImageError(f"format {fmt} not allowed; expected one of {', '.join(sorted(ALLOWED_FORMATS))}")
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels (decompression "
                                 "bomb?); a larger limit is --max-pixels (serve)")
            img.load()  # a full decode: catches truncated and corrupt data that the header hides
        except UnidentifiedImageError:
            raise ImageError("not an image (unrecognised content)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # Pillow refuses before its header is ours to read: say it in nnforge's terms, with nnforge's limit
            found = re.search(r"\((\d+) pixels\)", str(err))
            size = f"{int(found.group(1))} pixels" if found else "the image"
            raise ImageError(f"{size} is over the limit of {max_pixels} pixels (decompression bomb?); a larger "
                             "limit is --max-pixels (serve)") from None
        except (OSError, SyntaxError, ValueError) as err:
            if isinstance(err, ImageError):
                raise
            raise ImageError(f"corrupt or truncated image ({err})") from None
    if min(w, h) < min_size:
        raise ImageError(f"{w}x{h} is smaller than the minimum side of {min_size} px")
    return img


def check_image(path: str | Path, min_size: int = 8) -> ImageCheck:
    """Decode a file fully and report whether it is usable, with its content hash (for duplicate finding)."""
    p = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return ImageCheck(p, False, f"unreadable ({err.strerror})")
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = _open(data, min_size)
    except ImageError as err:
        return ImageCheck(p, False, str(err), digest)
    return ImageCheck(p, True, "", digest, img.width, img.height, img.mode)


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale as Pillow opens it


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image scaled to 8 bits (value / 257), where Pillow's convert("L") would clip at 255;
    any other image as it is."""
    if img.mode not in HIGH_BIT_MODES:
        return img
    arr = np.asarray(img, dtype=np.float64).clip(0, 65535)
    return Image.fromarray((arr / 257.0).round().astype(np.uint8), "L")


def to_array(img: Image.Image, channels: int, size: int) -> np.ndarray:
    """Image -> uint8 (C, size, size): resize the shorter side to `size`, centre-crop the longer one."""
    img = to_8bit(img).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None if max(w, h) < 4 * size else 3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def decode_image(data: bytes, channels: int, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 (C, size, size), or ImageError. The one preprocessing path for cache, predict and server."""
    return to_array(_open(data, 1, max_pixels), channels, size)


def read_image(path: str | Path, channels: int, size: int) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: unreadable ({err.strerror})") from None
    try:
        return decode_image(data, channels, size)
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None
