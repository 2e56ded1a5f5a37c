"""End to end through the real command line: train, evaluate, predict on a PNG tree with bad files in it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import make_png_tree

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def nnforge(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "nnforge.cli", *args], capture_output=True, text=True, env=ENV,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"nnforge {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_train_evaluate_predict_end_to_end(png_tree, tmp_path):
    before = {p: p.read_bytes() for p in png_tree.rglob("*") if p.is_file()}
    out = tmp_path / "runs"
    p = nnforge("train", "image", "--data", str(png_tree), "--epochs", "2", "--batch-size", "8", "--out", str(out),
                "--name", "e2e", "--workers", "1", "--precision", "fp32")
    run = out / "image" / "e2e"
    assert Path(p.stdout.strip().splitlines()[-1]) == run
    # every bad file is reported with a reason, on screen and in the run
    report = json.loads((run / "data_report.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"zero.png", "notes.txt", "truncated.png", "corrupt.png"}
    assert "empty" in skipped["zero.png"]
    assert "not an image" in skipped["notes.txt"]
    assert "truncated" in skipped["truncated.png"] or "corrupt" in skipped["truncated.png"]
    for name in skipped:
        assert name in p.stderr
    assert "tensor cache" in p.stderr
    # source files are never modified
    assert {q: q.read_bytes() for q in png_tree.rglob("*") if q.is_file()} == before
    # the run folder is complete
    for f in ("config.yaml", "meta.json", "metrics.csv", "split.json", "checkpoints/last.safetensors",
              "checkpoints/best.safetensors", "eval/report.json", "eval/classification_report.txt"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert 0 < float(rows[0]["elapsed_s"]) < float(rows[1]["elapsed_s"])  # wall time of fit so far, for time-to-acc
    meta = json.loads((run / "meta.json").read_text())
    assert meta["classes"] == ["circle", "cross", "stripes"] and meta["io"]["input"]["channels"] == 1

    ev = nnforge("evaluate", str(run))
    assert 0.0 <= json.loads(ev.stdout)["accuracy"] <= 1.0
    cm = json.loads((run / "eval" / "report.json").read_text())["confusion_matrix"]
    assert sum(map(sum, cm)) == len(json.loads((run / "split.json").read_text())["test"])

    preds = tmp_path / "preds.csv"
    pr = nnforge("predict", str(run), str(png_tree / "circle"), "--top-k", "2", "--output", str(preds))
    rows = list(csv.DictReader(preds.open()))
    good = [r for r in rows if not r["error"]]
    bad = {Path(r["input"]).name for r in rows if r["error"]}
    assert bad == {"zero.png", "corrupt.png"}  # reported and skipped, the rest predicted
    assert len(good) == 16 and all(r["label_1"] in meta["classes"] for r in good)
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in good)
    assert "skipped" in pr.stderr
    js = tmp_path / "preds.json"
    nnforge("predict", str(run), str(png_tree / "cross" / "000.png"), "--output", str(js))
    assert len(json.loads(js.read_text())["predictions"][0]["labels"]) == 3


def test_clear_errors_name_the_problem(tmp_path):
    empty_class = make_png_tree(tmp_path / "a", per_class=4, bad_files=False)
    (empty_class / "nothing").mkdir()
    p = nnforge("train", "image", "--data", str(empty_class), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and "nothing" in p.stderr and "empty" in p.stderr

    lonely = make_png_tree(tmp_path / "b", per_class=4, bad_files=False)
    (lonely / "single").mkdir()
    (lonely / "single" / "x.png").write_bytes((lonely / "circle" / "000.png").read_bytes())
    p = nnforge("train", "image", "--data", str(lonely), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and "single" in p.stderr and "at least 2" in p.stderr

    nothing = tmp_path / "c" / "cls"
    nothing.mkdir(parents=True)
    (nothing / "a.txt").write_text("x")
    (nothing / "b.txt").write_text("y")
    p = nnforge("train", "image", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and "no usable images" in p.stderr

    p = nnforge("train", "image", "--data", str(empty_class), "--epochs", "two", check=False)
    assert p.returncode == 2 and "epochs" in p.stderr

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: x\nepochz: 3\n")
    p = nnforge("train", "image", "--config", str(cfg), check=False)
    assert p.returncode == 2 and "unknown key 'epochz'" in p.stderr and "epochs" in p.stderr


def test_layouts_split_folders_and_csv(tmp_path):
    root = tmp_path / "splits"
    make_png_tree(root / "train", per_class=8, bad_files=False)
    make_png_tree(root / "test", per_class=3, seed=1, bad_files=False)
    # a train image copied into test: exact-duplicate leakage must be reported
    (root / "test" / "circle" / "leak.png").write_bytes((root / "train" / "circle" / "000.png").read_bytes())
    from nnforge.config import ImageTrainConfig
    from nnforge.data.cache import TensorCache
    from nnforge.data.images import ImageData

    msgs = []
    data = ImageData.load(ImageTrainConfig(data=str(root), workers=1), TensorCache(tmp_path / "c"), log=msgs.append)
    assert sum(data.report["counts"]["test"].values()) == 10
    assert sum(data.report["counts"]["val"].values()) == 3  # 10% of each class carved from train
    leaks = [d for d in data.report["duplicates"] if d["leak"]]
    assert len(leaks) == 1 and {"train", "test"} == set(leaks[0]["splits"])
    assert any("leakage" in m for m in msgs)

    # a dev/ folder is the validation split, as dev.csv is for texts (one rule: nnforge/data/rules.py)
    make_png_tree(root / "dev", per_class=2, seed=2, bad_files=False)
    data = ImageData.load(ImageTrainConfig(data=str(root), workers=1), TensorCache(tmp_path / "c"), log=msgs.append)
    assert sum(data.report["counts"]["val"].values()) == 6 and sum(data.report["counts"]["train"].values()) == 24
    shutil.rmtree(root / "dev")

    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    data = ImageData.load(ImageTrainConfig(data=str(tmp_path / "list.csv"), workers=1, seed=3),
                          TensorCache(tmp_path / "c"), log=msgs.append)
    assert data.classes == ["circle", "cross", "stripes"] and data.report["usable"] == 34
    assert all(sum(data.report["counts"][s].values()) > 0 for s in ("train", "val", "test"))


def test_cache_is_reused_and_rebuilt_when_files_change(tmp_path):
    root = make_png_tree(tmp_path / "d", per_class=4, bad_files=False)
    from nnforge.config import ImageTrainConfig
    from nnforge.data.cache import TensorCache
    from nnforge.data.images import ImageData

    cache = TensorCache(tmp_path / "cache")
    msgs = []
    ImageData.load(ImageTrainConfig(data=str(root), workers=1), cache, log=msgs.append)
    assert any("decoding" in m for m in msgs)
    msgs.clear()
    ImageData.load(ImageTrainConfig(data=str(root), workers=1), cache, log=msgs.append)
    assert any("reusing" in m for m in msgs)
    (root / "circle" / "000.png").unlink()
    msgs.clear()
    d = ImageData.load(ImageTrainConfig(data=str(root), workers=1), cache, log=msgs.append)
    assert any("decoding" in m for m in msgs) and d.report["usable"] == 11


def test_model_args_reach_the_model_and_travel_with_the_run(tmp_path):
    from nnforge.api import load

    data = make_png_tree(tmp_path / "d", per_class=6, bad_files=False)
    p = nnforge("train", "image", "--data", str(data), "--epochs", "1", "--batch-size", "8", "--out",
                str(tmp_path / "r"), "--name", "w8", "--model-args", "width=8", "--precision", "fp32")
    run = Path(p.stdout.strip().splitlines()[-1])
    predictor = load(run)  # rebuilt from the run alone: the option travels in the checkpoint
    first_conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.out_channels == 8
    assert json.loads((run / "meta.json").read_text())["model_kwargs"]["width"] == 8

    bad = nnforge("train", "image", "--data", str(data), "--out", str(tmp_path / "r"), "--model-args", "widht=8",
                  check=False)
    assert bad.returncode == 2 and "'widht'" in bad.stderr and "width=16" in bad.stderr
    clash = nnforge("train", "image", "--data", str(data), "--out", str(tmp_path / "r"), "--model-args",
                    "in_chans=3", check=False)
    assert clash.returncode == 2 and "in_chans" in clash.stderr


def test_compile_trains_the_same_model_and_saves_plain_weights(tmp_path):
    """--compile changes how steps run, not what they compute; the checkpoint holds the plain module's tensors."""
    from nnforge.api import load

    data = make_png_tree(tmp_path / "d", per_class=8, bad_files=False)
    common = ["train", "image", "--data", str(data), "--model", "seed_cnn", "--epochs", "2", "--batch-size", "8",
              "--precision", "fp32", "--out", str(tmp_path / "r")]
    nnforge(*common, "--name", "eager")
    nnforge(*common, "--name", "compiled", "--compile")
    eager, compiled = (list(csv.DictReader((tmp_path / "r" / "image" / n / "metrics.csv").open()))
                       for n in ("eager", "compiled"))
    for a, b in zip(eager, compiled, strict=True):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-3
        assert abs(float(a["val_loss"]) - float(b["val_loss"])) < 1e-3
    # no "_orig_mod." keys: the compiled run loads into a plain model and answers as the eager run does
    files = [str(f) for c in ("circle", "cross", "stripes") for f in sorted((data / c).iterdir())[:2]]
    compiled_p = load(tmp_path / "r" / "image" / "compiled").predict_proba(files)
    eager_p = load(tmp_path / "r" / "image" / "eager").predict_proba(files)
    np.testing.assert_allclose(compiled_p, eager_p, atol=1e-2)
    assert (compiled_p.argmax(1) == eager_p.argmax(1)).all()
