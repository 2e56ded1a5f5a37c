"""GANs end to end on tiny data made here (scikit-learn's 8x8 digits written as 16 px PNGs): models, training with
an exact resume after SIGTERM, sample grids, FID (nnforge features), class conditioning, ONNX export and a real
server on 127.0.0.1.

    .venv/bin/pytest tests/test_gan.py -q

Nothing is mocked: the engine, the data layer, torchmetrics, ONNX Runtime and uvicorn are the real ones. The only
injection is the SIGTERM, sent by the batch source at a chosen batch (as tests/test_task_interface.py does), so
that the interruption lands mid-epoch every time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import serving_in_thread
from PIL import Image

import nnforge
from nnforge.cli import main
from nnforge.data.imageio import read_image
from nnforge.data.inputs import InputError, TooManyInputs, build_input
from nnforge.data.rules import DataError
from nnforge.engine.checkpoint import load_checkpoint
from nnforge.engine.errors import TrainingInterrupted
from nnforge.engine.run import Run
from nnforge.models import create_model, list_models
from nnforge.tasks.gan import GanBatches
from nnforge.tasks.gan_features import Features, fid, kid, precision_recall

DIGITS = (0, 1, 7)  # three classes that look nothing alike: class consistency has a clear chance level of 1/3
TINY = dict(image_size=16, batch_size=32, precision="fp32", fid_samples=100)
DEADLINE = 120.0


def write_digits(root: Path, per_class: int, classes=DIGITS, flat: bool = False) -> Path:
    """scikit-learn's 8x8 digits as 16x16 grayscale PNGs: one folder per class (d0, d1, ...), or all in one."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        folder = root if flat else root / f"d{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(np.where(d.target == c)[0][:per_class]):
            img = Image.fromarray((d.images[j] * (255 / 16)).astype(np.uint8))
            img.resize((16, 16), Image.Resampling.BILINEAR).save(folder / f"{c}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = write_digits(tmp_path_factory.mktemp("gan") / "digits", per_class=180)
    (root / "d0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # reported and skipped
    return root


@pytest.fixture(scope="module")
def cdcgan_run(digits, tmp_path_factory) -> Path:
    """A conditional DCGAN trained long enough (a few hundred steps) to follow its class input."""
    run = nnforge.train("gan", data=str(digits), model="cdcgan", epochs=10, lr=2e-3, model_args={"width": 16},
                        features_epochs=3, eval_samples=300, out=str(tmp_path_factory.mktemp("runs")), name="c",
                        **TINY)
    return run.path


# ----------------------------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("size,channels,width", [(16, 1, 8), (32, 3, 8), (64, 1, 4)])
def test_every_gan_model_runs_forward_and_backward(size, channels, width):
    torch.manual_seed(0)
    for name in list_models(task="gan"):
        cond = {"num_classes": 3} if name.startswith("cdcgan") else {}
        y = torch.tensor([0, 2])
        if name.endswith("generator"):
            m = create_model(name, z_dim=16, channels=channels, image_size=size, width=width, **cond)
            out = m(torch.randn(2, 16), y if cond else None)
            assert out.shape == (2, channels, size, size) and out.abs().max() <= 1
        else:
            m = create_model(name, channels=channels, image_size=size, width=width, spectral_norm=size == 32, **cond)
            out = m(torch.randn(2, channels, size, size), y if cond else None)
            assert out.shape == (2,)
        assert torch.isfinite(out).all()
        out.float().pow(2).mean().backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f"{name}: no gradient for {missing}"
    with pytest.raises(ValueError, match="16, 32, 64 or 128"):
        create_model("dcgan_generator", image_size=28)
    # the served form of a conditional generator: the class rides in the last column
    g = create_model("cdcgan_generator", num_classes=3, z_dim=16, channels=1, image_size=16, width=8).eval()
    z = torch.randn(2, 16)
    packed = torch.cat([z, torch.tensor([[1.0], [2.0]])], 1)
    assert torch.equal(g(packed), g(z, torch.tensor([1, 2])))


# ----------------------------------------------------------------------------------------------------------------
# training: a flat folder (no classes), grids every epoch, exact resume after SIGTERM


def _tensors(run_path: Path) -> dict:
    return load_checkpoint(run_path / "checkpoints" / "last.safetensors")[0]


def _metrics(run_path: Path) -> list[dict]:
    timing = ("epoch_time_s", "elapsed_s", "examples_per_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in Run(run_path).read_metrics()]


def test_dcgan_on_a_flat_folder_trains_draws_grids_and_resumes_bit_identically(tmp_path, monkeypatch):
    flat = write_digits(tmp_path / "flat", per_class=8, classes=range(10), flat=True)
    common = dict(data=str(flat), epochs=3, model_args={"width": 8}, eval_samples=64, out=str(tmp_path),
                  **{**TINY, "batch_size": 16})
    straight = nnforge.train("gan", name="straight", features_epochs=1, **common).path

    # the data had no classes: the feature classifier learned which way images were turned
    features = straight / "image" / "features"
    assert Run(features).meta["classes"] == ["rot000", "rot090", "rot180", "rot270"]
    rows = Run(straight).read_metrics()
    assert {"train_d_loss", "train_g_loss", "train_d_real", "train_d_fake", "val_fid"} <= set(rows[0])
    assert all(np.isfinite(float(r["val_fid"])) for r in rows)

    # the same fixed noise every epoch, kept in the run; the grid changes as G learns
    assert (straight / "samples" / "fixed_noise.safetensors").is_file()
    grids = [np.asarray(Image.open(straight / "samples" / f"epoch_{e:03d}.png")) for e in (1, 2, 3)]
    assert grids[0].shape == grids[2].shape and not np.array_equal(grids[0], grids[1])
    with Image.open(straight / "samples" / "progress.gif") as gif:
        assert gif.n_frames == 3

    # SIGTERM mid-epoch (epoch 2, batch 2), with the feature classifier given this time: a checkpoint at the next
    # step, then a resume that ends exactly where the uninterrupted run did
    original = GanBatches.epoch

    def stopping(self, epoch, start=0):
        for b, batch in enumerate(original(self, epoch, start), start):
            if (epoch, b) == (1, 2):
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(GanBatches, "epoch", stopping)
    with pytest.raises(TrainingInterrupted):
        nnforge.train("gan", name="interrupted", features=str(features), **common)
    monkeypatch.setattr(GanBatches, "epoch", original)
    interrupted = tmp_path / "gan" / "interrupted"
    state = load_checkpoint(interrupted / "checkpoints" / "last.safetensors")[1]["state"]
    assert state["stopped"] == "interrupted" and (state["epoch"], state["batch_in_epoch"]) == (1, 3)
    nnforge.train("gan", resume=str(interrupted))
    a, b = _tensors(straight), _tensors(interrupted)
    assert a.keys() == b.keys() and any(k.startswith("generator_ema.") for k in a)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    assert _metrics(straight) == _metrics(interrupted)

    # training ended with an evaluation: report.json and the GAN's section of report.html
    report = json.loads((straight / "eval" / "report.json").read_text())
    assert report["fid"] >= 0 and report["fid_floor"] >= 0 and {"kid", "precision", "recall"} <= set(report)
    html = (straight / "report.html").read_text()
    assert "FID (nnforge features)" in html and "Memorisation" in html and "Confusion" not in html


def test_cdcgan_needs_class_folders(tmp_path):
    flat = write_digits(tmp_path / "flat", per_class=4, classes=(3,), flat=True)
    with pytest.raises(DataError, match="no class sub-folders"):
        nnforge.train("gan", data=str(flat), model="cdcgan", out=str(tmp_path), **TINY)


# ----------------------------------------------------------------------------------------------------------------
# measuring


def _u8(folder: Path) -> torch.Tensor:
    return torch.from_numpy(np.stack([read_image(p, 1, 16) for p in sorted(folder.rglob("*_*.png"))]))


def test_fid_is_zero_for_a_set_against_itself_and_large_against_noise(cdcgan_run, digits):
    feats = Features(cdcgan_run / "image" / "features")
    real = _u8(digits)
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    a, b = feats.features(real[order[:200]]), feats.features(real[order[200:400]])
    noise = feats.features(torch.randint(0, 256, (200, 1, 16, 16), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(1)))
    floor = fid(a, b)  # real against real: what a perfect generator would score with 200 samples
    assert fid(a, a) < 1e-6 * max(1.0, floor)
    assert fid(a, noise) > 5 * floor
    # KID draws its subsets of each side apart, so a set against itself is ~0 (unbiased), not exactly 0
    k_self, k_noise = kid(a, a, subsets=20, subset_size=100)[0], kid(a, noise, subsets=20, subset_size=100)[0]
    assert abs(k_self) < 0.05 * k_noise, (k_self, k_noise)
    assert precision_recall(a, a) == (1.0, 1.0)
    (p_real, r_real), (p_noise, r_noise) = precision_recall(a, b), precision_recall(a, noise)
    assert r_real > 0.8 and r_noise < 0.1 and p_real > p_noise  # noise covers none of the digits


def test_cdcgan_follows_its_class_and_reports_it(cdcgan_run):
    report = json.loads((cdcgan_run / "eval" / "report.json").read_text())
    assert report["class_consistency"] > 1 / 3 + 0.2, report["class_consistency_per_class"]  # chance: 1/3
    assert set(report["class_consistency_per_class"]) == {"d0", "d1", "d7"}
    assert report["classifier_accuracy"] > 0.9
    checks = {s["check"]: s["status"] for s in report["doctor"]}
    assert set(checks) == {"discriminator", "collapse", "conditioning", "memorisation"}
    data_report = json.loads((cdcgan_run / "data_report.json").read_text())
    assert [s["path"].endswith("broken.png") for s in data_report["skipped"]] == [True]
    html = (cdcgan_run / "report.html").read_text()
    assert "Class consistency per class" in html and "nearest training image" in html and "floor" in html


def test_generate_is_seeded_and_names_the_classes(cdcgan_run, tmp_path, capsys):
    one = nnforge.generate(cdcgan_run, n=6, class_name="d1", seed=7)
    again = nnforge.generate(cdcgan_run, n=6, class_name="d1", seed=7, out=str(tmp_path / "grid.png"))
    other = nnforge.generate(cdcgan_run, n=6, class_name="d0", seed=7)
    assert one["images"].shape == (6, 16, 16, 1) and one["images"].dtype == np.uint8
    assert np.array_equal(one["images"], again["images"]) and not np.array_equal(one["images"], other["images"])
    assert Image.open(tmp_path / "grid.png").size == (6 * 18 + 2, 18 + 2)
    with pytest.raises(InputError, match=r"unknown class 'sneaker'; this generator's classes: d0, d1, d7"):
        nnforge.generate(cdcgan_run, n=2, class_name="sneaker")
    assert main(["generate", str(cdcgan_run), "--class", "sneaker", "--out", str(tmp_path / "x.png")]) == 2
    assert "d0, d1, d7" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert main(["generate", str(cdcgan_run), "--n", "3", "--seed", "7", "--out-dir", str(tmp_path / "each")]) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert main(["generate", str(cdcgan_run), "--n", "3", "--out-dir", str(tmp_path / "each")]) == 2  # no --force


def test_the_onnx_generator_matches_pytorch_and_keeps_the_class_input(cdcgan_run):
    card = nnforge.export(cdcgan_run)
    assert card["io"]["verb"] == "generate" and card["parity"]["max_abs_diff"] < 1e-4
    loaded = nnforge.load(cdcgan_run)
    rows = np.stack(loaded.input.sample(8, seed=3))  # classes in turn in the last column
    session = ort.InferenceSession(str(cdcgan_run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": rows})[0]
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    swapped = rows.copy()
    swapped[:, -1] = (swapped[:, -1] + 1) % 3
    assert np.abs(session.run(None, {"input": swapped})[0] - got).max() > 0.1  # the class changes the image


# ----------------------------------------------------------------------------------------------------------------
# serving



def test_the_server_returns_pngs_and_refuses_bad_requests(cdcgan_run):
    with serving_in_thread(cdcgan_run, backend="torch") as url:
        r = httpx.post(url + "/v1/generate", json={"n": 4, "class": "d1", "seed": 7}, timeout=DEADLINE)
        assert r.status_code == 200, r.text
        rows = r.json()["images"]
        assert [row["input"] for row in rows] == [f"d1/seed=7/{i}" for i in range(4)]
        pngs = [Image.open(io.BytesIO(base64.b64decode(row["png"]))) for row in rows]
        assert all(p.format == "PNG" and p.size == (16, 16) and p.mode == "L" for p in pngs)
        served = np.stack([np.asarray(p) for p in pngs])
        local = nnforge.generate(cdcgan_run, n=4, class_name="d1", seed=7)["images"][..., 0]
        assert np.abs(served.astype(int) - local.astype(int)).max() <= 1  # the same samples from the same seed

        fresh = httpx.post(url + "/v1/generate", json={"n": 2}, timeout=DEADLINE).json()["images"]
        assert fresh[0]["input"].startswith("seed=") and fresh[0]["input"].endswith("/0")  # the seed to repeat it

        def refused(body: dict, status: int, words: str) -> None:
            r = httpx.post(url + "/v1/generate", json=body, timeout=DEADLINE)
            assert r.status_code == status and words in r.json()["detail"], (body, r.status_code, r.text)

        refused({"n": 65, "seed": 1}, 413, "the limit is 64")
        refused({"n": 2, "seed": "seven"}, 400, '"seed" must be a whole number')
        refused({"n": 2, "seed": -1}, 400, '"seed" must be a whole number')
        refused({"n": 2, "class": "sneaker"}, 400, "classes: d0, d1, d7")
        refused({"n": 0}, 400, '"n" must be a whole number >= 1')
        refused({"n": 2, "colour": "red"}, 400, "unknown key(s) colour")
        other = httpx.post(url + "/v1/predict", json={"images": []}, timeout=DEADLINE)
        assert other.status_code == 404 and "answers POST /v1/generate" in other.json()["detail"]


def test_latent_requests_are_checked_without_a_model():
    pre = build_input({"kind": "latent", "z_dim": 4, "classes": ["a", "b"]})
    rows = pre.read_json({"n": 3, "seed": 5}, max_inputs=8)
    assert [r[1][-1] for r in rows] == [0.0, 1.0, 0.0]  # the classes in turn
    assert np.array_equal(np.stack([r for _, r in rows]), np.stack(pre.sample(3, seed=5)))
    explicit = pre.read_json({"z": [[0, 0, 0, 0, 1]]}, max_inputs=8)
    assert pre.decode(explicit[0][1]).tolist() == [0, 0, 0, 0, 1]
    with pytest.raises(TooManyInputs):
        pre.read_json({"n": 9}, max_inputs=8)
    with pytest.raises(InputError, match="class index 2"):
        pre.decode([0, 0, 0, 0, 2])
    with pytest.raises(InputError, match="expected 5 numbers"):
        pre.decode([0, 0, 0])
    with pytest.raises(InputError, match="without n, seed or class"):
        pre.read_json({"z": [[0, 0, 0, 0, 1]], "n": 1}, max_inputs=8)
    plain = build_input({"kind": "latent", "z_dim": 4})
    with pytest.raises(InputError, match="unconditional"):
        plain.read_json({"n": 1, "class": "a"}, max_inputs=8)
    with pytest.raises(InputError, match='"n" must be'):
        plain.read_json({"n": True}, max_inputs=8)
