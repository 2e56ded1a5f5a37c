"""HTML plumbing shared by misclassified.html and report.html: escaping, page shell, thumbnails, the gallery.

Every piece of text that reaches a page goes through `esc`; every picture is a base64 data URI, so a page is
one self-contained file that opens anywhere, offline, without JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

THUMB_MAX = 96  # px, longest side of a gallery thumbnail
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def esc(value: Any) -> str:
    """Text for an HTML body or a quoted attribute value."""
    return html.escape(str(value), quote=True)


def png_b64(png: bytes) -> str:
    if not png.startswith(PNG_MAGIC):
        raise ValueError("expected PNG bytes (wrong signature)")
    return base64.b64encode(png).decode("ascii")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + png_b64(png)


def img_tag(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="{png_data_uri(png)}">'


def thumbnail_png(source: str | Path | bytes) -> bytes | None:
    """A PNG thumbnail (longest side <= THUMB_MAX) of an image file or encoded bytes; None if unreadable.

    Tiny images (28x28 digits) are enlarged by a whole factor with nearest-neighbour, so pixels stay crisp in
    any viewer; larger ones are shrunk with a smoothing filter.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im = ImageOps.exif_transpose(im)  # phone photos: show them the way they were taken
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
            w, h = im.size
            if max(w, h) <= THUMB_MAX // 2:
                f = THUMB_MAX // max(w, h)
                im = im.resize((w * f, h * f), Image.Resampling.NEAREST)
            elif max(w, h) > THUMB_MAX:
                im = im.copy()
                im.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        # OSError covers missing files and Pillow's UnidentifiedImageError; the gallery then shows the path
        return None


CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --soft:#f6f8fa; --accent:#0969da;
        --good:#1a7f37; --bad:#cf222e; --warn-bg:#fff8c5; --warn-line:#d4a72c; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--soft); color: var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; }
header { background: #1f2328; color: #fff; padding: 22px 0 0; }
header .wrap { padding-bottom: 0; }
header h1 { margin: 0; font-size: 24px; font-weight: 600; }
header .sub { color: #c9d1d9; margin: 2px 0 14px; }
nav { display: flex; flex-wrap: wrap; gap: 2px; }
nav a { color: #e6edf3; text-decoration: none; padding: 8px 12px; border-radius: 6px 6px 0 0;
        font-size: 14px; }
nav a:hover { background: #32383f; }
.wrap { max-width: 1160px; margin: 0 auto; padding: 0 24px; }
main.wrap { padding-top: 20px; padding-bottom: 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 24px 22px;
          margin-bottom: 20px; }
h2 { font-size: 19px; margin: 0 0 12px; padding-bottom: 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; }
.muted { color: var(--muted); }
.na { color: var(--muted); font-style: italic; background: var(--soft); border: 1px dashed var(--line);
      border-radius: 6px; padding: 10px 14px; margin: 8px 0; }
.warn { background: var(--warn-bg); border: 1px solid var(--warn-line); border-radius: 6px;
        padding: 8px 14px; margin: 8px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px;
         margin: 4px 0 14px; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .v { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .k { color: var(--muted); font-size: 13px; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 8px 28px; }
table { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; margin: 4px 0 8px; }
th, td { padding: 4px 12px; border-bottom: 1px solid #eaeef2; text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
td.l, th.l { text-align: left; }
tr.sum td { font-weight: 600; border-top: 2px solid var(--line); }
table.kv td:first-child { color: var(--muted); padding-right: 20px; }
td.path, .path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
          word-break: break-all; text-align: left; }
.track { display: inline-block; width: 90px; height: 9px; border-radius: 2px; background: #eaeef2; }
.bar { display: block; height: 9px; border-radius: 2px; background: var(--accent); }
img.plot { max-width: 100%; height: auto; display: block; margin: 6px 0; }
details summary { cursor: pointer; color: var(--accent); margin: 8px 0; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px;
      overflow-x: auto; font-size: 13px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 12px; }
.gallery.text { grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); }
.tile { border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px; background: #fff;
        font-size: 13px; }
.tile .thumb { height: 100px; display: flex; align-items: center; justify-content: center;
               background: var(--soft); border-radius: 4px; margin-bottom: 6px; }
.tile .thumb img { image-rendering: pixelated; max-width: 96px; max-height: 96px; }
.tile .thumb .missing { color: var(--muted); font-size: 12px; padding: 4px; text-align: center; }
.tile .txt { max-height: 9em; overflow: auto; background: var(--soft); border-radius: 4px; padding: 6px 8px;
             margin-bottom: 6px; white-space: pre-wrap; word-break: break-word; }
.tile .true { color: var(--good); font-weight: 600; }
.tile .pred { color: var(--bad); font-weight: 600; }
.tile .item { color: var(--muted); font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 11.5px;
              word-break: break-all; }
"""


def page(title: str, body: str, header: str = "") -> str:
    """A complete HTML document; `body` and `header` are already-escaped HTML."""
    head = header or f'<div class="wrap"><h1>{esc(title)}</h1><div class="sub"></div></div>'
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header>{head}</header>\n<main class=\"wrap\">\n{body}\n</main>\n</body>\n</html>\n")


def na(what: str) -> str:
    return f'<p class="na">{esc(what)}</p>'


def gallery(entries: list[dict], kind: str) -> str:
    """Tiles for the worst mistakes; `entries` are the rows of eval/mistakes.json."""
    if not entries:
        return na("No misclassified examples.")
    tiles = []
    for e in entries:
        if kind == "text":
            shown = f'<div class="txt">{esc(e["item"])}</div>'
            where = short = f"row {e['index']}"
        else:
            thumb = e.get("thumbnail")
            if thumb:
                src = "data:image/png;base64," + thumb
                shown = f'<div class="thumb"><img alt="{esc(e["item"])}" src="{src}"></div>'
            else:
                shown = '<div class="thumb"><div class="missing">image could not be read</div></div>'
            where = f"#{e['index']} {e['item']}"
            short = f"#{e['index']} " + "/".join(Path(e["item"]).parts[-2:])  # class folder + file name
        tiles.append(
            f'<div class="tile">{shown}'
            f'<div>true <span class="true">{esc(e["true"])}</span></div>'
            f'<div>pred <span class="pred">{esc(e["pred"])}</span></div>'
            f'<div class="muted">conf {e["confidence"]:.3f} &middot; loss {e["loss"]:.2f}</div>'
            f'<div class="item" title="{esc(where)}">{esc(short)}</div></div>'
        )
    return f'<div class="gallery {esc(kind)}">{"".join(tiles)}</div>'
