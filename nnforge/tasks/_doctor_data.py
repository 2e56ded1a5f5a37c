"""The doctor's data checks (counts, duplicates, leaks, corrupt files, sizes or text lengths) and its
picture of one training batch as the model receives it.

The batch grid is drawn with Pillow and an integer nearest-neighbour zoom only, so each tile holds exactly the
values the model got, un-normalised back to 0..255: what a person sees is what the model trains on.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SPLITS = ("train", "val", "test")
IMBALANCE_RATIO = 3.0  # largest / smallest class: the line the data report's own note uses
GRID_MAX, LABEL_STRIP = 64, 14  # examples shown (more make tiles too small to judge); px of caption per tile


@dataclass
class Check:
    name: str
    status: str  # PASS | WARN | FAIL
    message: str  # what was found, in one line
    advice: str = ""  # what to do about it
    details: dict = field(default_factory=dict)


def _short(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _spread(v: np.ndarray) -> dict:
    return {"min": float(v.min()), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max())}


# ------------------------------------------------------------------------------------------------------------
# 1. data


def balance_check(data, cfg) -> Check:
    """Class counts and imbalance; on imbalance, which training option handles it."""
    k = len(data.classes)
    counts = {sp: torch.bincount(data.labels(sp), minlength=k).tolist() for sp in SPLITS}
    train = counts["train"]
    lo, hi = min(train), max(train)
    ratio = hi / max(1, lo)
    small, large = data.classes[train.index(lo)], data.classes[train.index(hi)]
    details = {"per_class": {c: {sp: counts[sp][i] for sp in SPLITS} for i, c in enumerate(data.classes)},
               "ratio": ratio, "smallest": small, "largest": large}
    msg = f"{k} classes, {lo} to {hi} training examples each"
    status, advice = "PASS", []
    if ratio > IMBALANCE_RATIO:
        handled = ("--class-weights auto" if cfg.class_weights == "auto"
                   else "--sampler balanced" if cfg.sampler == "balanced" else None)
        if handled:
            msg += f" (imbalanced {ratio:.1f}:1, handled by {handled})"
        else:
            status = "WARN"
            msg += f": imbalanced {ratio:.1f}:1 ('{large}' vs '{small}')"
            advice.append("train with --class-weights auto (the loss weighs classes by inverse frequency), "
                          "or --sampler balanced (classes drawn equally often, rare examples repeat) when "
                          "rare classes are so small that most batches miss them")
    missing = [f"{c} ({sp})" for sp in ("val", "test") if sum(counts[sp])
               for i, c in enumerate(data.classes) if counts[sp][i] == 0]
    if missing:
        status = "WARN"
        msg += f"; no examples of {', '.join(missing[:5])}"
        advice.append("put examples of every class in val/test, or those classes cannot be measured")
    return Check("data.balance", status, msg, "; ".join(advice), details)


def duplicate_checks(data) -> list[Check]:
    """Identical content (file hash; for texts, the text up to case and spacing) across and within splits."""
    dups = data.report.get("duplicates") or []
    root = str(data.report.get("data", ""))
    leaks = [d for d in dups if d["leak"]]
    within = [d for d in dups if not d["leak"]]
    if leaks:
        examples = "; ".join(" == ".join(_short(p, root) for p in d["paths"][:2]) for d in leaks[:3])
        leak = Check("data.leakage", "FAIL",
                     f"{len(leaks)} examples are in more than one split, e.g. {examples}",
                     "delete the copies from val/test (or from train): a model scored on examples it trained "
                     "on reports an inflated accuracy", {"leaks": leaks})
    else:
        leak = Check("data.leakage", "PASS", "no example appears in more than one split")
    if within:
        extra = sum(len(d["paths"]) - 1 for d in within)
        conflicting = sum(1 for d in within if len(d["labels"]) > 1)
        msg = f"{len(within)} groups of identical examples within a split ({extra} extra copies)"
        msg += f"; {conflicting} of them carry different labels" if conflicting else ""
        dup = Check("data.duplicates", "WARN", msg,
                    "delete the extra copies (they count those examples twice); identical examples with "
                    "different labels are label noise: fix or drop them", {"duplicates": within})
    else:
        dup = Check("data.duplicates", "PASS", "no identical examples within a split")
    return [leak, dup]


def _empty_row(skip: dict) -> bool:
    return "empty" in skip["reason"] or "no tokens" in skip["reason"]


def corrupt_check(data) -> Check:
    """Unusable files (images) or malformed rows (texts; empty rows are data.text's business)."""
    skipped = [s for s in data.report.get("skipped") or [] if data.kind == "image" or not _empty_row(s)]
    files = data.report.get("files", data.report.get("rows", "?"))
    if not skipped:
        return Check("data.corrupt", "PASS", f"nothing unusable among {files} inputs")
    root = str(data.report.get("data", ""))
    first = "; ".join(f"{_short(s['path'], root)}: {s['reason']}" for s in skipped[:3])
    return Check("data.corrupt", "WARN", f"{len(skipped)} unusable inputs skipped, e.g. {first}",
                 "fix or delete them: training skips them; doctor.json lists them all",
                 {"skipped": skipped, "reasons": dict(Counter(s["reason"].split(" (")[0] for s in skipped))})


def image_size_check(data, sample: int = 2000) -> Check:
    """Sizes and aspect ratios from the file headers of a seeded sample of at most 2,000 images."""
    paths = [p for sp in SPLITS for p in data.items(sp)]
    if len(paths) > sample:
        paths = [paths[i] for i in np.random.default_rng(0).choice(len(paths), sample, replace=False)]
    wh = []
    for p in paths:
        with Image.open(p) as img:  # reads the header only
            wh.append(img.size)
    w, h = np.array(wh, dtype=float).T
    aspect = np.maximum(w / h, h / w)
    far = float(np.mean(aspect > 4 / 3))
    small = float(np.mean(np.minimum(w, h) < data.size / 2))
    details = {"sampled": len(paths), "width": _spread(w), "height": _spread(h), "aspect": _spread(aspect),
               "beyond_4_3": far, "upscaled_2x": small, "model_side": data.size}
    msg = (f"{len(paths)} images, {int(w.min())}-{int(w.max())} x {int(h.min())}-{int(h.max())} px, "
           f"the model sees {data.size}x{data.size}")
    problems = []
    if far > 0.1:
        problems.append(f"{far:.0%} are further from square than 4:3 (the centre crop cuts their edges off)")
    if small > 0.1:
        problems.append(f"{small:.0%} have a shorter side under {data.size // 2} px (blown up 2x or more)")
    if problems:
        return Check("data.sizes", "WARN", f"{msg}; {'; '.join(problems)}",
                     "check that what matters survives the square centre crop; pick --img-size near the "
                     "typical shorter side", details)
    return Check("data.sizes", "PASS", msg, "", details)


def text_rows_check(data, cfg) -> Check:
    """Empty rows (the loader skips them) and the spread of lengths, in tokens from the loader's report."""
    skipped = data.report.get("skipped") or []
    empty = [s for s in skipped if _empty_row(s)]
    tok = data.report.get("tokenizer") or {}
    texts = [t for sp in SPLITS for t in data.items(sp)]
    words = np.array([len(t.split()) for t in texts], dtype=float)
    truncated = int(tok.get("truncated", 0))
    max_len = tok.get("max_len", getattr(cfg, "max_len", None))
    details = {"texts": len(texts), "empty_rows": len(empty), "words": _spread(words), "tokens": tok}
    msg = (f"{len(texts)} texts of {int(words.min())}-{int(words.max())} words; tokens: mean "
           f"{tok.get('tokens_mean', '?')}, 95% at most {tok.get('tokens_p95', '?')}, longest "
           f"{tok.get('tokens_max', '?')} (cut at {max_len})")
    problems, advice = [], []
    if empty:
        root = str(data.report.get("data", ""))
        problems.append(f"{len(empty)} empty rows skipped (e.g. {_short(empty[0]['path'], root)})")
        advice.append("fill or delete the empty rows")
    if truncated > 0.05 * len(texts):
        problems.append(f"{truncated / len(texts):.0%} of texts are cut at --max-len {max_len}")
        advice.append(f"raise --max-len if their ends matter (95% of texts have at most "
                      f"{int(np.percentile(words, 95))} words)")
    if problems:
        return Check("data.text", "WARN", f"{msg}; {'; '.join(problems)}", "; ".join(advice), details)
    return Check("data.text", "PASS", msg, "", details)


def data_checks(data, cfg) -> list[Check]:
    checks = [balance_check(data, cfg), *duplicate_checks(data), corrupt_check(data)]
    checks.append(image_size_check(data) if data.kind == "image" else text_rows_check(data, cfg))
    return checks


# ------------------------------------------------------------------------------------------------------------
# 2. one training batch as the model receives it


def unnormalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Normalised float (B, C, H, W) -> uint8 (B, C, H, W): the inverse of data.images.normalise."""
    u = (x.detach().float().cpu() * std.view(1, -1, 1, 1).cpu() + mean.view(1, -1, 1, 1).cpu()) * 255
    return u.round().clamp(0, 255).to(torch.uint8).numpy()


def batch_grid(images: np.ndarray, labels: list[str], path: Path) -> dict:
    """Save uint8 (B, C, H, W) images as a captioned grid; returns the layout (to find a tile again)."""
    images, labels = images[:GRID_MAX], labels[:GRID_MAX]
    b, c, h, w = images.shape
    zoom = max(1, min(8, math.ceil(64 / max(h, w))))  # small images are blown up to about 64 px for the eye
    cols, pad = min(8, b), 2
    tw, th = w * zoom, h * zoom + LABEL_STRIP
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, math.ceil(b / cols) * (th + pad) + pad), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i in range(b):
        tile = images[i].transpose(1, 2, 0)  # (H, W, C)
        tile = np.repeat(tile, 3, axis=2) if c == 1 else tile[:, :, :3]
        x0, y0 = pad + (i % cols) * (tw + pad), pad + (i // cols) * (th + pad)
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile.repeat(zoom, 0).repeat(zoom, 1))), (x0, y0))
        text = labels[i]
        while text and draw.textlength(text, font=font) > tw - 2:
            text = text[:-1]
        draw.text((x0 + 1, y0 + h * zoom + 1), text, fill="black", font=font)
    canvas.save(path)
    return {"file": path.name, "shown": b, "cols": cols, "zoom": zoom, "pad": pad, "tile_w": tw, "tile_h": th,
            "labels": labels}


def grid_tile(grid: np.ndarray, layout: dict, i: int, height: int) -> np.ndarray:
    """Tile i of a saved grid (an (H, W, 3) array) back at its original resolution: (height, width, 3)."""
    cols, pad, tw, th, z = layout["cols"], layout["pad"], layout["tile_w"], layout["tile_h"], layout["zoom"]
    x0, y0 = pad + (i % cols) * (tw + pad), pad + (i // cols) * (th + pad)
    return grid[y0:y0 + height * z:z, x0:x0 + tw:z]


def text_batch_table(data, x: torch.Tensor, labels: list[str], path: Path) -> dict:
    """A text batch as a TSV table: label, the tokens the model gets (padding dropped), their decoded text."""
    tok, pad = data.tokenizer, data.pad_id
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, delimiter="\t")
        out.writerow(["label", "tokens", "decoded"])
        for i in range(min(len(labels), GRID_MAX)):
            ids = [t for t in x[i].tolist() if t != pad]
            out.writerow([labels[i], " ".join(str(tok.id_to_token(t)) for t in ids), tok.decode(ids)])
    return {"file": path.name, "shown": min(len(labels), GRID_MAX), "labels": labels[:GRID_MAX]}


def batch_check(data, x: torch.Tensor, y: torch.Tensor, folder: Path) -> Check:
    k = len(data.classes)
    labels = [data.classes[i] if 0 <= i < k else f"<{i}?>" for i in y.tolist()]
    present = sorted(set(labels))
    details: dict = {"shape": list(x.shape), "dtype": str(x.dtype), "classes_in_batch": len(present)}
    shown = min(len(y), GRID_MAX)
    if data.kind == "image":
        details["picture"] = batch_grid(unnormalise(x, data.mean, data.std), labels, folder / "batch.png")
        xf = x.float().transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
        mean, std = xf.mean(1), xf.std(1)
        details.update(mean=mean.tolist(), std=std.tolist())
        where = f"{folder / 'batch.png'}: {shown} of {len(y)} inputs of {tuple(x.shape[1:])}"
        stats = f"mean {', '.join(f'{v:.2f}' for v in mean)}, std {', '.join(f'{v:.2f}' for v in std)}"
    else:
        details["table"] = text_batch_table(data, x, labels, folder / "batch.tsv")
        mean = std = None
        where = f"{folder / 'batch.tsv'}: {shown} of {len(y)} texts"
        stats = f"{x.shape[1]} tokens wide"
    if not torch.isfinite(x.float()).all():
        return Check("batch", "FAIL", f"{where}; the batch holds NaN or infinite values",
                     "find the inputs that turn into NaN/inf (a constant channel divided by a zero std?)",
                     details)
    if ((y < 0) | (y >= k)).any():
        return Check("batch", "FAIL", f"{where}; labels outside 0..{k - 1}",
                     "the label mapping is broken: every label must index a class", details)
    if mean is not None and (mean.abs().max() > 1 or std.max() > 5 or std.min() < 0.2):
        return Check("batch", "WARN", f"{where}; {stats}: not normalised to about mean 0 and std 1",
                     "check the normalisation statistics, then look at the picture", details)
    if len(present) == 1 and k > 1 and len(y) >= 2 * k:
        return Check("batch", "WARN", f"{where}; every example is '{present[0]}'",
                     "batches should mix classes: is the training data shuffled?", details)
    look = ("do the pictures still match their labels after augmentation?" if data.kind == "image"
            else "do the decoded texts read right and match their labels?")
    return Check("batch", "PASS", f"{where}, {len(present)} classes; {stats}", f"look at it: {look}", details)
