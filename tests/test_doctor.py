"""The doctor on real files: a clean data set passes, and each planted fault fails the check meant for it.

    .venv/bin/pytest tests/test_doctor.py -q

Planted faults and the check that catches them: a train image copied into test (data.leakage), labels that do
not follow the images (baseline: the loss at init cannot see labels, and a model can memorise one batch of
random labels, so neither init_loss nor overfit is the check for this), a model that ignores its input
(baseline), softmax applied before the loss (overfit), a far too large initial logit scale (init_loss), a far
too large learning rate (lr_range), and class imbalance (data.balance suggests --class-weights / --sampler).
Also: both of those options change training, and `nnforge compare` reports two runs' differences.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, make_png_tree
from PIL import Image
from test_text import review, write_csv
from torch import nn

from nnforge import api, cli
from nnforge.config import ImageTrainConfig
from nnforge.data.cache import TensorCache
from nnforge.data.images import ImageData
from nnforge.engine.seeding import seed_everything
from nnforge.models import create_model, register_model
from nnforge.models.registry import IMAGE_CLASSIFIER_ARGS, TEXT_CLASSIFIER_ARGS
from nnforge.tasks._doctor_data import grid_tile

FAST = {"workers": 1, "device": "cpu"}


def nnforge_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The real command line (parsing, command, exit status), in this process: (status, stdout, stderr)."""
    capsys.readouterr()
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


class IgnoresInput(nn.Module):
    """Logits from a learned bias alone: whatever the image, the same prediction."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(1, num_classes)

    def forward(self, x):  # (B, C, H, W) -> (B, K), independent of x
        return self.head(torch.ones(len(x), 1, device=x.device))


@register_model("doctor_test_ignores_input", task="classify", input="image", head="head",
                data_args=IMAGE_CLASSIFIER_ARGS)
def doctor_test_ignores_input(num_classes: int, in_chans: int = 3, img_size: int = 32, pretrained=False):
    """Test-only: a model whose output does not depend on its input."""
    return IgnoresInput(num_classes)


class BagOfTokens(nn.Module):
    """A tiny text classifier (mean of token embeddings, padding excluded): cheap enough for test budgets."""

    def __init__(self, num_classes: int, vocab_size: int, pad_id: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, 16, mode="mean", padding_idx=pad_id)
        self.head = nn.Linear(16, num_classes)

    def forward(self, ids):  # (B, T) -> (B, K)
        return self.head(self.embed(ids))


@register_model("doctor_test_bag", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS)
def doctor_test_bag(num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 128, pretrained=False):
    """Test-only: a bag of token embeddings."""
    return BagOfTokens(num_classes, vocab_size, pad_id)


class SmallNet(nn.Module):
    """A tiny MLP (fast enough for hundreds of steps); softmax=True plants the classic bug of returning
    probabilities to a loss that expects logits: the loss then cannot go below ln(e + K - 1) - 1."""

    def __init__(self, num_classes: int, pixels: int, softmax: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)
        self.softmax = softmax

    def forward(self, x):
        logits = self.head(self.body(x))
        return logits.softmax(1) if self.softmax else logits


def shuffle_labels(root: Path, seed: int = 0) -> None:
    """Move every image into a random class folder (each keeps its count): labels no longer follow content."""
    files = sorted(root.rglob("*.png"))
    dest = [f.parent for f in files]
    np.random.default_rng(seed).shuffle(dest)
    staged = [f.rename(root / f"tmp_{i}.png") for i, f in enumerate(files)]
    for i, (f, d) in enumerate(zip(staged, dest, strict=True)):
        f.rename(d / f"s{i:03d}.png")


# ----------------------------------------------------------------------------------------------------------
# a clean data set passes, through the real command line


def test_clean_data_passes_every_check_from_the_cli(tmp_path, capsys):
    data = make_png_tree(tmp_path / "shapes", per_class=12, bad_files=False)
    out = tmp_path / "doc"
    status, stdout, stderr = nnforge_cli(capsys, "doctor", "--data", str(data), "--model", "seed_cnn",
                                         "--out", str(out), "--workers", "1", "--device", "cpu")
    assert status == 0, stdout + stderr
    report = json.loads((out / "doctor.json").read_text())
    checks = by_name(report)
    assert list(checks) == ["data.balance", "data.leakage", "data.duplicates", "data.corrupt", "data.sizes",
                            "batch", "init_loss", "lr_range", "baseline", "overfit"]
    assert {c["status"] for c in checks.values()} == {"PASS"}, stdout
    for name in checks:  # every check printed with its verdict
        assert any(line.startswith("PASS") and name in line for line in stdout.splitlines()), name
    assert abs(checks["init_loss"]["details"]["excess_nats"]) < 0.1
    lr = checks["lr_range"]["details"]
    assert lr["suggested_lr"] == pytest.approx(lr["min_loss_lr"] / 10)
    assert 1e-4 < lr["suggested_lr"] < 1.0 and lr["suggested_lr"] > lr["lrs"][0]
    assert checks["baseline"]["details"]["acc_real"] > 0.8
    for picture in ("batch.png", "lr_range.png"):
        with Image.open(out / picture) as img:
            assert img.size[0] > 100 and len(np.unique(np.array(img.convert("L")))) > 10  # drawn, not blank


def test_batch_picture_shows_the_inputs_the_model_gets_with_their_labels(tmp_path):
    """With augmentation off, every tile un-normalises to exactly a source image of the class it is labelled
    with: the picture shows what the model gets, with the right labels."""
    data = make_png_tree(tmp_path / "shapes", per_class=6, bad_files=False)
    report = api.doctor("image", data=str(data), out=tmp_path / "doc", only=["batch"], crop_pad=0, flip=False,
                        **FAST)
    check = by_name(report)["batch"]
    assert check["status"] == "PASS"
    layout = check["details"]["picture"]
    grid = np.array(Image.open(tmp_path / "doc" / "batch.png").convert("RGB"))
    sources = {c: [np.array(Image.open(f)) for f in sorted((data / c).glob("*.png"))] for c in CLASSES}
    assert layout["shown"] == len(layout["labels"]) >= 12
    for i, label in enumerate(layout["labels"]):
        tile = grid_tile(grid, layout, i, 16)[:, :, 0]
        assert any(np.array_equal(tile, s) for s in sources[label]), f"tile {i} is not a '{label}' image"


# ----------------------------------------------------------------------------------------------------------
# planted faults


def test_a_train_image_copied_into_test_is_a_leak(tmp_path):
    root = tmp_path / "split"
    make_png_tree(root / "train", per_class=6, bad_files=False)
    make_png_tree(root / "test", per_class=2, seed=1, bad_files=False)
    shutil.copy(root / "train" / "cross" / "003.png", root / "test" / "cross" / "copied.png")
    report = api.doctor("image", data=str(root), out=tmp_path / "doc", only=["data"], **FAST)
    checks = by_name(report)
    assert report["status"] == "FAIL" and checks["data.leakage"]["status"] == "FAIL"
    msg = checks["data.leakage"]["message"]
    assert "1 examples" in msg and "train/cross/003.png" in msg and "test/cross/copied.png" in msg
    assert {checks[n]["status"] for n in ("data.balance", "data.duplicates", "data.corrupt")} == {"PASS"}

    os.remove(root / "test" / "cross" / "copied.png")  # the same data without the copy is clean
    clean = api.doctor("image", data=str(root), out=tmp_path / "doc2", only=["data"], **FAST)
    assert by_name(clean)["data.leakage"]["status"] == "PASS"


def test_shuffled_labels_fail_the_baseline_not_the_init_loss(tmp_path):
    """Labels that do not follow the images leave the loss at init at ln K (an untrained model cannot tell),
    but real inputs stop beating zeroed ones on held-out examples. (The same model and check pass on intact
    labels in the clean-data test.)"""
    data = make_png_tree(tmp_path / "shapes", per_class=20, bad_files=False)
    shuffle_labels(data)
    report = api.doctor("image", data=str(data), model="seed_cnn", out=tmp_path / "doc",
                        only=["init_loss", "baseline"], **FAST)
    checks = by_name(report)
    assert checks["init_loss"]["status"] == "PASS"
    base = checks["baseline"]
    assert base["status"] == "FAIL", base["message"]
    assert "do not help" in base["message"] and "labels" in base["advice"]
    assert base["details"]["output_change_on_blind_input"] > 0  # the model did read its input


def test_a_model_that_ignores_its_input_fails_the_baseline(tmp_path):
    data = make_png_tree(tmp_path / "shapes", per_class=8, bad_files=False)
    report = api.doctor("image", data=str(data), model="doctor_test_ignores_input", out=tmp_path / "doc",
                        only=["baseline"], **FAST)
    base = by_name(report)["baseline"]
    assert base["status"] == "FAIL" and "does not depend on the input" in base["message"]
    assert "not using its input" in base["advice"]


def test_softmax_before_the_loss_fails_overfit_but_not_init(tmp_path):
    data = make_png_tree(tmp_path / "shapes", per_class=8, bad_files=False)
    kw = dict(data=str(data), only=["init_loss", "overfit"], lr=3e-3, **FAST)
    bug = by_name(api.doctor("image", model=SmallNet(3, 256, softmax=True), out=tmp_path / "bug", **kw))
    assert bug["init_loss"]["status"] == "PASS"  # probabilities near 1/K look like fine logits at init
    assert bug["overfit"]["status"] == "FAIL" and "softmax" in bug["overfit"]["advice"]
    assert bug["overfit"]["details"]["tries"][-1]["loss"] > np.log(np.e + 2) - 1 - 1e-3  # the floor
    fixed = by_name(api.doctor("image", model=SmallNet(3, 256), out=tmp_path / "ok", **kw))
    assert fixed["overfit"]["status"] == "PASS"


def test_init_loss_is_ln_k_for_resnet_tiny_and_fails_for_a_huge_logit_scale(tmp_path):
    data = make_png_tree(tmp_path / "shapes", per_class=6, bad_files=False)
    kw = dict(data=str(data), only=["init_loss"], **FAST)
    ok = by_name(api.doctor("image", model="resnet_tiny", out=tmp_path / "ok", **kw))["init_loss"]
    assert ok["status"] == "PASS" and abs(ok["details"]["excess_nats"]) < 0.05  # its small logit scale
    model = create_model("resnet_tiny", num_classes=3, in_chans=1, img_size=16)
    model.logit_scale = 40.0  # instead of 0.125: confident, random predictions before any training
    check = by_name(api.doctor("image", model=model, out=tmp_path / "bad", **kw))["init_loss"]
    assert check["status"] == "FAIL" and check["details"]["excess_nats"] > 2
    assert model.logit_scale == 40.0 and not any(p.grad is not None for p in model.parameters())


def test_a_far_too_large_lr_is_flagged_with_a_suggestion(tmp_path):
    data = make_png_tree(tmp_path / "shapes", per_class=8, bad_files=False)
    report = api.doctor("image", data=str(data), model=SmallNet(3, 256), out=tmp_path / "doc",
                        only=["lr_range"], lr=5.0, **FAST)
    check = by_name(report)["lr_range"]
    assert check["status"] == "WARN" and "past the lowest-loss lr" in check["message"]
    suggested = check["details"]["suggested_lr"]
    assert suggested < 0.5 and f"--lr {suggested:.2g}" in check["advice"]
    assert (tmp_path / "doc" / "lr_range.png").is_file()


def imbalanced_tree(root: Path, bad_files: bool = False) -> Path:
    make_png_tree(root, per_class=16, bad_files=bad_files)
    for f in sorted((root / "circle").glob("0*.png"))[3:]:
        f.unlink()  # circle keeps 3 images, cross and stripes 16
    return root


def test_imbalance_suggests_weights_or_sampler_and_corrupt_files_are_counted(tmp_path):
    data = imbalanced_tree(tmp_path / "shapes", bad_files=True)
    checks = by_name(api.doctor("image", data=str(data), out=tmp_path / "doc", only=["data"], **FAST))
    bal = checks["data.balance"]
    assert bal["status"] == "WARN" and "imbalanced" in bal["message"]
    assert bal["details"]["smallest"] == "circle"
    assert "--class-weights auto" in bal["advice"] and "--sampler balanced" in bal["advice"]
    bad = checks["data.corrupt"]
    assert bad["status"] == "WARN" and bad["message"].startswith("4 unusable inputs")
    assert {Path(s["path"]).name for s in bad["details"]["skipped"]} == {"zero.png", "notes.txt",
                                                                           "truncated.png", "corrupt.png"}
    assert "no examples of circle (val), circle (test)" in bal["message"] and "val/test" in bal["advice"]
    handled = by_name(api.doctor("image", data=str(data), out=tmp_path / "doc2", only=["data"],
                                 class_weights="auto", **FAST))["data.balance"]
    assert "handled by --class-weights auto" in handled["message"] and "--sampler" not in handled["advice"]


def test_unknown_check_names_are_refused(tmp_path):
    data = make_png_tree(tmp_path / "shapes", per_class=4, bad_files=False)
    with pytest.raises(ValueError, match="unknown doctor checks \\['speed'\\]; choose from data, batch"):
        api.doctor("image", data=str(data), out=tmp_path / "doc", only=["data", "speed"], **FAST)


# ----------------------------------------------------------------------------------------------------------
# what the doctor suggests, training does


def test_balanced_sampler_draws_classes_equally(tmp_path):
    data = imbalanced_tree(tmp_path / "shapes")
    share = {}
    for sampler in ("shuffle", "balanced"):
        cfg = ImageTrainConfig(data=str(data), batch_size=8, sampler=sampler, val_split=0, test_split=0,
                               **FAST)
        source = ImageData.load(cfg, TensorCache(tmp_path / "cache"), log=lambda *_: None).train_source(
            torch.device("cpu"))
        ys = torch.cat([y for epoch in range(30) for _, y in source.epoch(epoch)])
        share[sampler] = torch.bincount(ys, minlength=3).float() / len(ys)  # circle is class 0
    assert share["shuffle"][0] < 0.15  # 3 of 35 images
    assert share["balanced"].min() > 0.28 and share["balanced"].max() < 0.39


def test_class_weights_auto_weighs_the_training_loss_by_inverse_frequency(tmp_path):
    """At lr 0 the model keeps its initial weights, so an epoch's train_loss is a plain function of the
    batches: a run with --class-weights auto must report the inverse-frequency-weighted loss computed here."""
    data = imbalanced_tree(tmp_path / "shapes")
    kw = dict(data=str(data), epochs=1, batch_size=8, lr=0.0, precision="fp32", val_split=0.2, test_split=0,
              **FAST)
    reported = {}
    for cw in ("none", "auto"):
        run = api.train("image", out=str(tmp_path / "runs"), name=cw, class_weights=cw, **kw)
        with (run.path / "metrics.csv").open() as f:
            reported[cw] = float(next(csv.DictReader(f))["train_loss"])

    cfg = ImageTrainConfig(**kw)
    seed_everything(cfg.seed)  # as training does, before building the model
    d = ImageData.load(cfg, TensorCache(), log=lambda *_: None)
    model = create_model(cfg.model, num_classes=3, **d.model_kwargs()).train()
    counts = torch.bincount(d.labels("train"), minlength=3).float()
    weight = counts.sum() / (3 * counts)  # inverse frequency; all ones if balanced
    assert weight[0] > 3 and d.classes[0] == "circle"  # the rare class weighs most
    sums, seen = {"none": 0.0, "auto": 0.0}, 0
    with torch.no_grad():
        for x, y in d.train_source(torch.device("cpu")).epoch(0):
            logits = model(x)
            for cw, w in (("none", None), ("auto", weight)):
                loss = F.cross_entropy(logits, y, weight=w, label_smoothing=cfg.label_smoothing)
                sums[cw] += loss.item() * len(y)
            seen += len(y)
    for cw in ("none", "auto"):
        assert reported[cw] == pytest.approx(sums[cw] / seen, rel=1e-4), cw
    assert abs(reported["auto"] - reported["none"]) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# compare


def test_compare_cli_prints_per_metric_and_per_class_differences(png_tree, trained_run, tmp_path, capsys):
    # the shared tiny run (resnet_tiny, 3 short epochs) against a seed_cnn trained on the same split
    other = api.train("image", data=str(png_tree), model="seed_cnn", epochs=4, batch_size=8, lr=3e-3,
                      out=str(tmp_path / "runs"), name="short", workers=1, precision="fp32", val_split=0.2,
                      test_split=0.2)
    # both runs were evaluated when their training ended
    status, stdout, stderr = nnforge_cli(capsys, "compare", str(trained_run), str(other.path))
    assert status == 0, stderr
    written = Path(trained_run) / "compare_short.json"
    assert f"wrote {written}" in stderr
    result = json.loads(written.read_text())
    assert set(result["per_class"]) == set(CLASSES) and not result["warnings"]  # same split, same classes
    a = json.loads((Path(trained_run) / "eval" / "report.json").read_text())
    b = json.loads((other.path / "eval" / "report.json").read_text())
    assert result["metrics"]["accuracy"]["diff"] == pytest.approx(b["accuracy"] - a["accuracy"])
    for line in ("accuracy", "macro_f1", "ece", *CLASSES):
        assert any(row.split()[:1] == [line] for row in stdout.splitlines()), line
    changed = result["improved"] + result["worse"]
    assert changed, "a better-trained model should move some class's F1"
    for c in result["improved"]:
        assert c in next(row for row in stdout.splitlines() if row.startswith("F1 improved"))
    for c in result["worse"]:
        assert c in next(row for row in stdout.splitlines() if row.startswith("F1 worse"))

    chosen = tmp_path / "cmp.json"
    assert api.compare(trained_run, other, output=chosen)["output"] == str(chosen)
    assert json.loads(chosen.read_text())["per_class"] == result["per_class"]
    with pytest.raises(FileNotFoundError, match="nnforge evaluate"):
        api.compare(trained_run, tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------
# text


def test_text_doctor_reports_leaks_and_empty_rows_and_shows_decoded_batches(tmp_path, capsys):
    root = tmp_path / "reviews"
    root.mkdir()
    write_csv(root / "train.csv", n=60, extra=['"",pos'])  # one empty row
    test = [f'"{review(i, lab)}",{lab}' for i, lab in ((1000, "pos"), (1001, "neg"), (1002, "pos"))]
    test.append(f'"{review(4, "pos")}",pos')  # row 4 of train.csv, again
    (root / "test.csv").write_text("text,label\n" + "\n".join(test) + "\n")
    out = tmp_path / "doc"
    args = ["--task", "text", "--data", str(root), "--model", "doctor_test_bag", "--vocab-size", "300",
            "--batch-size", "16", "--out", str(out), "--only", "data,batch,baseline", "--device", "cpu"]
    status, stdout, stderr = nnforge_cli(capsys, "doctor", *args)
    assert status == 1, stdout + stderr  # the leak is a FAIL
    checks = by_name(json.loads((out / "doctor.json").read_text()))
    assert "FAIL  data.leakage" in stdout
    assert "test.csv:5 == train.csv:6" in checks["data.leakage"]["message"]
    assert checks["data.text"]["status"] == "WARN" and "1 empty rows skipped (e.g. train.csv:62)" in \
        checks["data.text"]["message"]
    assert checks["data.corrupt"]["status"] == "PASS"  # the empty row is data.text's, not counted twice
    assert checks["baseline"]["status"] == "PASS"
    with (out / "batch.tsv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    texts = {review(i, ("pos", "neg")[i % 2]): ("pos", "neg")[i % 2] for i in range(60)}
    assert len(rows) == 16 and all(texts[r["decoded"].strip()] == r["label"] for r in rows)
