"""Evaluating a GAN run: FID and KID (nnforge features), precision/recall, class consistency, a memorisation check
and the doctor's GAN signs, into eval/report.json and a section of report.html.

    nnforge evaluate runs/gan/exp1 [--features runs/image/exp3] [--data more/real/images]

What is measured, on the served generator (the EMA copy) and N = min(eval_samples, training images, test images):

    fid, fid_floor        FID (nnforge features) of N samples against N training images, and of N real test
                          images against the same training images: the floor a perfect generator would reach
    kid, kid_floor        the same with the kernel inception distance (unbiased, so small N matters less)
    precision, recall     Kynkäänniemi et al. (k=3): realistic samples / covered variety
    class_consistency     conditional: the share of samples made for class y that the classifier calls y
    diversity_ratio       mean pairwise feature distance of samples over that of real images (collapse: << 1)
    memorisation_ratio    samples' median distance to their nearest training image over real test images' (<< 1:
                          copies); the closest pairs are shown side by side in report.html

The features are those of an nnforge classifier (gan_features.py says why): never compare these FIDs with
Inception FIDs from papers.
"""

from __future__ import annotations

import base64
import html
import math
import sys
from pathlib import Path

import numpy as np
import torch

from nnforge.config import GanConfig, build_config, read_yaml_mapping
from nnforge.data.imageio import ImageError, read_image
from nnforge.engine.run import Run
from nnforge.evaluation.grids import grid, save_png
from nnforge.evaluation.report import add_section, write_report
from nnforge.inference import Loaded
from nnforge.outputs import png_bytes, to_uint8
from nnforge.tasks.gan_features import (
    Features,
    class_shares,
    diversity,
    fid,
    kid,
    load_images,
    nearest,
    precision_recall,
    require_torchmetrics,
    split_u8,
)

# The doctor's GAN signs (constants with units and reasons, as in doctor.py)
D_LOSS_NEAR_ZERO = 0.05  # nats per step (epoch mean): D(x) ~ 0.975 and D(G(z)) ~ 0.025; G gets almost no gradient
D_WINS_EPOCHS = 2  # ... for this many epochs in a row (a whole epoch is hundreds of steps on real data)
COLLAPSE_DIVERSITY = 0.5  # samples spread less than half as much as real images in feature space: collapse
DOMINANT_FACTOR, DOMINANT_SHARE = 3.0, 0.3  # a class 3x as frequent as in the real data and >= 30% of samples
SHARES_APART = 0.4  # or the samples' class shares this far from the real ones (total variation distance)
WEAK_CONDITIONING = 0.5  # a conditional generator whose samples are their class less than half the time
MEMORISED_RATIO = 0.5  # samples twice as close to a training image as real test images are: copies
MEMO_QUERIES, MEMO_SHOWN = 1000, 8


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# inputs


def _features_path(run: Run, meta: dict, given: str | None) -> Path:
    if given:
        return Path(given)
    recorded = meta.get("features_run")
    if not recorded:
        raise ValueError(f"{run.path}: no feature classifier recorded; pass --features RUN (an nnforge image run)")
    p = Path(recorded)
    return p if p.is_absolute() else run.path / p


def _folder_u8(folder: str, channels: int, size: int) -> torch.Tensor:
    """Every readable image under a folder (class folders or flat), as (N, C, S, S) uint8."""
    from nnforge.data.images import find_samples

    arrays, bad = [], 0
    for s in find_samples(folder, flat=True):
        try:
            arrays.append(read_image(s.path, channels, size))
        except ImageError:
            bad += 1
    if bad:
        _log(f"evaluate: skipped {bad} unreadable files under {folder}")
    if not arrays:
        raise ValueError(f"{folder}: no readable images to compare with")
    return torch.from_numpy(np.stack(arrays))


def _seed(cfg: GanConfig, offset: int = 0) -> int:
    """The run's seed as the latent kind takes one (0 .. 2**32 - 1), offset for a second stream."""
    return (cfg.seed + offset) % 2**32


def generate_u8(loaded: Loaded, rows: list[np.ndarray], batch: int = 500) -> torch.Tensor:
    """The served generator's samples for latent rows, (N, C, S, S) uint8 exactly as /v1/generate's PNGs."""
    out = []
    for i in range(0, len(rows), batch):
        raw = loaded.forward(loaded.input.batch(rows[i:i + batch]))
        out.append(torch.from_numpy(to_uint8(raw)).permute(0, 3, 1, 2))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# the evaluation


def evaluate_run(run_path: str | Path, data: str | None = None, device: str = "auto",
                 features: str | None = None) -> dict:
    require_torchmetrics()
    run = Run(run_path)
    cfg = build_config(GanConfig, read_yaml_mapping(run.path / "config.yaml"))
    cfg.data = run.read_json("data_report.json")["data"]  # resolved when trained: evaluate from any folder
    meta = run.meta
    gen = Loaded(run.path, device=device)
    feats = Features(_features_path(run, meta, features), gen.device)
    images = load_images(cfg)
    train_u8 = split_u8(images, "train")
    test_u8 = _folder_u8(data, images.channels, cfg.image_size) if data else split_u8(images, "test")
    test_labels = None if data else images.labels("test")
    if len(test_u8) < 2:
        raise ValueError(f"{run.path}: fewer than 2 real test images to measure against; pass --data FOLDER, or "
                         "train with --test-split 0.1")
    n = min(cfg.eval_samples, len(train_u8), len(test_u8))
    g = torch.Generator().manual_seed(_seed(cfg))
    ref_idx = torch.randperm(len(train_u8), generator=g)[:n]
    test_idx = torch.randperm(len(test_u8), generator=g)[:n]
    _log(f"evaluate: {n} samples against {n} training and {n} test images, in the features of {feats.path}")
    fake_u8 = generate_u8(gen, gen.input.sample(n, seed=_seed(cfg)))
    f_ref, f_test, f_fake = (feats.features(x) for x in (train_u8[ref_idx], test_u8[test_idx], fake_u8))

    report: dict = {"split": "test" if not data else str(data), "n": n, "fid": fid(f_ref, f_fake),
                    "fid_floor": fid(f_ref, f_test)}
    report["kid"], report["kid_std"] = kid(f_ref, f_fake)
    report["kid_floor"], _ = kid(f_ref, f_test)
    report["precision"], report["recall"] = precision_recall(f_ref, f_fake)
    report["diversity_ratio"] = diversity(f_fake) / max(1e-12, diversity(f_ref))
    report.update(_classes(gen, feats, images.classes, cfg, n, test_u8[test_idx],
                           None if test_labels is None else test_labels[test_idx], train_u8[ref_idx], fake_u8))
    shown = _memorisation(report, feats, train_u8, fake_u8, f_fake, f_test)
    report["features_run"], report["features_model"] = str(feats.path), feats.loaded.name
    report["doctor"] = doctor_signs(run.read_metrics(), report)
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    samples = save_png(grid(fake_u8[:64].permute(0, 2, 3, 1).numpy(), 8, scale=max(1, 64 // cfg.image_size)),
                       run.eval_dir / "samples.png")
    run.write_json("eval/report.json", report)
    add_section(run.path, "gan", "Generated images: FID (nnforge features), memorisation, doctor",
                section_html(run, report, samples, shown))
    floor = f" (floor {report['fid_floor']:.2f})"
    extra = (f", class consistency {report['class_consistency']:.2%}" if "class_consistency" in report else "")
    _log(f"evaluate: FID (nnforge features) {report['fid']:.2f}{floor}, KID {report['kid']:.4f}, precision "
         f"{report['precision']:.3f}, recall {report['recall']:.3f}{extra}; details in {run.eval_dir}")
    for sign in report["doctor"]:
        _log(f"  {sign['status']:4s} {sign['check']}: {sign['message']}")
    _log(f"report: {write_report(run.path)}")
    return report


def _classes(gen: Loaded, feats: Features, classes: list[str], cfg: GanConfig, n: int, test_u8, test_labels,
             ref_u8, fake_u8) -> dict:
    """Class consistency (conditional) or class shares (unconditional), and the classifier's own accuracy on real
    test images: the most the consistency can be."""
    out: dict = {}
    index = {c: i for i, c in enumerate(feats.classes)}
    if not classes or len(classes) < 2 or any(c not in index for c in classes):
        out["class_note"] = "the feature classifier does not know the data's classes: no class measures"
        return out
    to_clf = torch.tensor([index[c] for c in classes])
    if test_labels is not None:
        out["classifier_accuracy"] = float((feats.logits(test_u8).argmax(1) == to_clf[test_labels]).float().mean())
    if gen.input.classes:  # conditional: samples of each class, labelled by the classifier
        per = max(1, n // len(classes))
        per_class = {}
        for c in gen.input.classes:
            u8 = generate_u8(gen, gen.input.sample(per, class_name=c, seed=_seed(cfg, 1)))
            per_class[c] = float((feats.logits(u8).argmax(1) == index[c]).float().mean())
        out["class_consistency"] = float(np.mean(list(per_class.values())))
        out["class_consistency_per_class"] = per_class
    else:
        fake = class_shares(feats.logits(fake_u8), len(index))
        real = class_shares(feats.logits(ref_u8), len(index))
        out["class_shares"] = {c: float(fake[index[c]]) for c in classes}
        out["class_shares_real"] = {c: float(real[index[c]]) for c in classes}
        out["class_share_distance"] = float(0.5 * np.abs(fake - real).sum())  # total variation
    return out


def _memorisation(report: dict, feats: Features, train_u8, fake_u8, f_fake, f_test) -> list[dict]:
    """Each sample's nearest training image in feature space; the closest pairs are returned to be shown."""
    bank = feats.features(train_u8)
    d_fake, i_fake = nearest(f_fake[:MEMO_QUERIES], bank)
    d_test, _ = nearest(f_test[:MEMO_QUERIES], bank)
    med_fake, med_test = float(d_fake.median()), float(d_test.median())
    report["nearest_train_distance"] = med_fake
    report["nearest_train_distance_test"] = med_test
    report["memorisation_ratio"] = med_fake / max(1e-12, med_test)
    order = d_fake[:, 0].argsort()[:MEMO_SHOWN]
    return [{"sample": fake_u8[i], "train": train_u8[i_fake[i, 0]], "distance": float(d_fake[i, 0])}
            for i in order.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# the doctor's GAN signs


def doctor_signs(metrics: list[dict], report: dict) -> list[dict]:
    """PASS / WARN lines from the logged metrics and the evaluation: D winning, collapse, one class dominating,
    weak conditioning, memorisation."""
    signs = []

    def sign(check: str, bad: bool, warn: str, ok: str) -> None:
        signs.append({"check": check, "status": "WARN" if bad else "PASS", "message": warn if bad else ok})

    d_losses = [float(r["train_d_loss"]) for r in metrics if r.get("train_d_loss") not in (None, "")]
    if d_losses:
        longest = run_ = 0
        for v in d_losses:
            run_ = run_ + 1 if v < D_LOSS_NEAR_ZERO else 0
            longest = max(longest, run_)
        need = min(D_WINS_EPOCHS, len(d_losses))
        sign("discriminator", longest >= need,
             f"D loss below {D_LOSS_NEAR_ZERO} for {longest} epoch(s) in a row (lowest {min(d_losses):.3g}): D wins "
             "every batch and G learns nothing; try --loss hinge, --spectral-norm, or a lower D learning rate",
             f"D loss never stayed below {D_LOSS_NEAR_ZERO} (lowest epoch mean {min(d_losses):.3g})")
    div = report["diversity_ratio"]
    sign("collapse", div < COLLAPSE_DIVERSITY,
         f"samples spread {div:.2f}x as much as real images in feature space: the generator collapsed onto a few "
         "modes", f"samples spread {div:.2f}x as much as real images (collapse below {COLLAPSE_DIVERSITY})")
    if "class_shares" in report:
        fake, real = report["class_shares"], report["class_shares_real"]
        top = max(fake, key=fake.get)
        tv = report["class_share_distance"]
        dominant = fake[top] >= DOMINANT_SHARE and fake[top] >= DOMINANT_FACTOR * max(real[top], 1e-9)
        bad = dominant or tv >= SHARES_APART
        sign("class balance", bad,
             f"'{top}' is {fake[top]:.0%} of the samples but {real[top]:.0%} of the real images (class shares "
             f"{tv:.0%} apart): one class dominates",
             f"the most frequent class in the samples, '{top}', is {fake[top]:.0%} of them ({real[top]:.0%} of "
             f"real images; class shares {tv:.0%} apart)")
    if "class_consistency" in report:
        cc = report["class_consistency"]
        ceiling = report.get("classifier_accuracy")
        sign("conditioning", cc < WEAK_CONDITIONING,
             f"only {cc:.0%} of the samples are the class they were made for: the class input is barely used",
             f"{cc:.0%} of the samples are the class they were made for"
             + (f" (the classifier is right on {ceiling:.0%} of real test images)" if ceiling is not None else ""))
    ratio = report["memorisation_ratio"]
    sign("memorisation", ratio < MEMORISED_RATIO,
         f"samples lie {ratio:.2f}x as far from their nearest training image as real test images do: it may be "
         "copying training images (see the pairs below)",
         f"samples lie {ratio:.2f}x as far from their nearest training image as real test images do")
    return signs


# ----------------------------------------------------------------------------------------------------------------
# the report section


def _img(u8_chw: torch.Tensor | np.ndarray, scale: int = 1, title: str = "") -> str:
    arr = np.asarray(u8_chw).transpose(1, 2, 0)
    if scale > 1:
        arr = arr.repeat(scale, 0).repeat(scale, 1)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(arr)).decode("ascii")
    t = html.escape(title)
    return f'<img alt="{t}" title="{t}" src="{uri}" style="image-rendering:pixelated">'


def _png_file(path: Path, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="{uri}" style="image-rendering:pixelated">'


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def section_html(run: Run, r: dict, samples: Path, shown: list[dict]) -> str:
    e = html.escape
    rows = [("FID (nnforge features)", r["fid"], r["fid_floor"]), ("KID (nnforge features)", r["kid"], r["kid_floor"]),
            ("precision (k=3)", r["precision"], None), ("recall (k=3)", r["recall"], None),
            ("feature diversity, samples / real", r["diversity_ratio"], None)]
    if "class_consistency" in r:
        rows.append(("class consistency", r["class_consistency"], r.get("classifier_accuracy")))
    table = "".join(f"<tr><td>{e(k)}</td><td>{_fmt(v)}</td><td>{_fmt(f)}</td></tr>" for k, v, f in rows)
    out = [f'<p class="muted">{r["n"]} samples of the served generator against {r["n"]} training images; the floor '
           f"is the same measure between real test and training images (class consistency: the classifier's own "
           f"accuracy on real test images). Features: <code>{e(r['features_run'])}</code> ({e(r['features_model'])}"
           "). These are <b>nnforge-feature</b> distances: they rank generators on this data, and are not "
           "comparable with Inception FID.</p>",
           f"<table><thead><tr><th class=l>measure</th><th>value</th><th>floor / ceiling</th></tr></thead>"
           f"<tbody>{table}</tbody></table>"]
    if "class_consistency_per_class" in r:
        per = "".join(f"<tr><td class=l>{e(c)}</td><td>{v:.2%}</td></tr>"
                      for c, v in r["class_consistency_per_class"].items())
        out.append(f"<h3>Class consistency per class</h3><table><tbody>{per}</tbody></table>")
    out.append("<h3>Doctor</h3><ul>" + "".join(
        f'<li><b class="{"warn" if s["status"] == "WARN" else "ok"}">{s["status"]}</b> {e(s["check"])}: '
        f"{e(s['message'])}</li>" for s in r["doctor"]) + "</ul>")
    out.append(f"<h3>Samples</h3>{_png_file(samples, 'samples of the served generator')}")
    gif = run.path / "samples" / "progress.gif"
    if gif.is_file():
        out.append('<p class="muted">The fixed-noise grid of every epoch: <a href="samples/progress.gif">'
                   "samples/progress.gif</a> (and samples/epoch_NNN.png).</p>")
    scale = max(1, 64 // int(shown[0]["sample"].shape[-1])) if shown else 1
    pairs = "".join(f"<tr><td>{_img(p['sample'], scale, 'sample')}</td><td>{_img(p['train'], scale, 'training')}"
                    f"</td><td>{p['distance']:.3f}</td></tr>" for p in shown)
    out.append(f"<h3>Memorisation: the samples closest to a training image</h3><p class=\"muted\">Median distance "
               f"to the nearest training image: samples {r['nearest_train_distance']:.3f}, real test images "
               f"{r['nearest_train_distance_test']:.3f} (ratio {r['memorisation_ratio']:.2f}; well below 1 would "
               "mean copies).</p><table><thead><tr><th>sample</th><th>nearest training image</th><th>distance</th>"
               f"</tr></thead><tbody>{pairs}</tbody></table>")
    return "".join(out)
