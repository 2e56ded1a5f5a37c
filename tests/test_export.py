"""ONNX export: the parity check, the model card, int8 quantisation, dynamic axes, and loading for serving.

    .venv/bin/pytest tests/test_export.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from nnforge.deploy.artifacts import ort_session
from nnforge.deploy.engine import choose_backend, load_engine
from nnforge.deploy.export import ExportError, _export_graph, export_onnx, parity
from nnforge.engine.checkpoint import load_checkpoint, save_checkpoint
from nnforge.inference import Loaded
from nnforge.outputs import softmax

ROOT = Path(__file__).resolve().parent.parent


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model*.onnx", "model.json", "tb"))
    return dst


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> tuple[Path, dict, str]:
    """A copy of the tiny run exported through the command line, with int8 (one export for the module)."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("export") / "run")
    out = subprocess.run([sys.executable, "-m", "nnforge.cli", "export", str(run), "--format", "onnx",
                          "--quantize", "int8"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return run, json.loads((run / "model.json").read_text()), out.stdout


def test_export_writes_a_model_and_a_card_that_serve_alone(exported, tmp_path):
    run, card, stdout = exported
    printed = json.loads(stdout)  # the CLI's summary
    assert printed["parity"]["top1_agreement"] == 1.0
    meta = json.loads((run / "meta.json").read_text())
    classes, spec = meta["classes"], meta["io"]["input"]
    assert card["io"] == meta["io"] and card["io"]["output"] == {"kind": "probs", "classes": classes}
    assert card["input"]["shape"] == ["batch", spec["channels"], spec["size"], spec["size"]]
    assert card["output"]["shape"] == ["batch", len(classes)]
    graph = onnx.load(str(run / "model.onnx"))
    assert card["opset"] == next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert not list(run.glob("*.onnx.data")), "weights must live inside model.onnx"
    test_items = json.loads((run / "split.json").read_text())["test"]
    assert card["parity"]["split"] == "test" and card["parity"]["items"] == len(test_items)
    assert card["parity"]["max_abs_diff"] < 1e-4

    # model.onnx + model.json alone (no checkpoint, no meta.json) give PyTorch's answers at any batch size
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("model.onnx", "model.json"):
        shutil.copy(run / name, alone / name)
    engine = load_engine(alone)
    assert engine.backend == "onnx" and engine.io == card["io"] and engine.io["output"]["classes"] == classes
    pred = Loaded(run, device="cpu")
    files = [p for p, _ in test_items]
    for n in (1, len(files)):
        x = pred.input.batch([pred.input.load(f) for f in files[:n]])
        np.testing.assert_allclose(softmax(engine.forward(x)), pred.predict_proba(files[:n]), atol=1e-5)


def test_int8_export_reports_the_accuracy_change(exported):
    run, card, _ = exported
    q = card["int8"]
    assert (run / "model.int8.onnx").stat().st_size < (run / "model.onnx").stat().st_size
    assert q["split"] == "test" and 0.0 <= q["accuracy_int8"] <= 1.0
    assert q["accuracy_change"] == pytest.approx(q["accuracy_int8"] - q["accuracy_fp32"])
    # the fp32 ONNX accuracy is the run's own test accuracy (same items, same preprocessing)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert q["accuracy_fp32"] == pytest.approx(report["accuracy"])
    assert load_engine(run, int8=True).backend == "onnx-int8"


def test_an_export_that_misses_the_tolerance_is_refused_and_not_kept(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    # ONNX Runtime's convolutions round differently from PyTorch's, so no export meets a 1e-15 tolerance
    with pytest.raises(ExportError, match="disagrees with PyTorch.*was not written"):
        export_onnx(run, tolerance=1e-15, exporter="torchscript")
    assert not list(run.glob("*.onnx")) and not list(run.glob(".model.onnx*")) and not (run / "model.json").exists()


def test_embed_gives_the_features_the_head_reads(trained_run):
    loaded = Loaded(trained_run, device="cpu")
    files = [p for p, _ in json.loads((trained_run / "split.json").read_text())["test"]][:4]
    vectors = loaded.embed(files)
    head = loaded.model.head
    assert vectors.shape == (len(files), head.in_features)
    logits = head(torch.from_numpy(vectors)).detach().numpy() * loaded.model.logit_scale
    np.testing.assert_allclose(softmax(logits), loaded.predict_proba(files), atol=1e-5)


def test_parity_catches_a_model_that_differs(exported):
    run, _, _ = exported
    pred = Loaded(run, device="cpu")
    session = ort_session(run / "model.onnx")
    x = pred.input.batch([pred.input.load(p) for p, _ in json.loads((run / "split.json").read_text())["test"]])
    assert parity(pred.model, session, [x], pred.output)["max_abs_diff"] < 1e-4
    with torch.no_grad():  # what a wrong export would look like: a layer computing something else
        pred.model.head.weight.zero_()  # (deterministic: every class but the first now scores exactly 0)
        pred.model.head.weight[0] = 100.0
    assert parity(pred.model, session, [x], pred.output)["max_abs_diff"] > 0.1


def test_the_torchscript_exporter_and_a_chosen_opset(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    card = export_onnx(run, opset=17, exporter="torchscript")
    assert card["exporter"] == "torchscript" and card["opset"] == 17
    assert card["parity"]["top1_agreement"] == 1.0 and not (run / "model.int8.onnx").exists()


class TokenModel(nn.Module):
    """A text-shaped model: token ids (B, T) with padding 0 -> logits; attention reshapes depend on T."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):  # (B, T) int64 -> (B, 3)
        keep = ids != 0
        h, _ = self.attn(self.emb(ids), self.emb(ids), self.emb(ids), key_padding_mask=~keep)
        h = (h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        return self.head(h)


def test_text_exports_have_dynamic_batch_and_sequence_axes(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().eval()
    path = tmp_path / "text.onnx"
    axes = {0: "batch", 1: "seq"}
    assert _export_graph(model, torch.randint(1, 50, (2, 7)), axes, "logits", path, None, "dynamo") == "dynamo"
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    session = ort_session(path)
    for b, t in [(1, 1), (5, 13), (3, 40)]:
        ids = torch.randint(1, 50, (b, t))
        ids[0, t // 2:] = 0  # padded like a batch of texts of different lengths
        with torch.no_grad():
            ref = model(ids).numpy()
        np.testing.assert_allclose(session.run(None, {"input": ids.numpy()})[0], ref, atol=1e-5)


def test_a_stale_export_is_not_served(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    assert choose_backend(run) == "onnx"
    best = run / "checkpoints" / "best.safetensors"
    tensors, meta = load_checkpoint(best)
    key = next(k for k in tensors if k.startswith("model."))
    tensors[key] = tensors[key] + 1.0  # as if training had continued
    save_checkpoint(best, tensors, meta)
    assert choose_backend(run) == "torch"  # the export no longer matches the checkpoint: PyTorch serves
    assert choose_backend(run, "onnx") == "onnx"  # unless ONNX is asked for by name


def test_bad_arguments_are_refused_with_the_allowed_values(trained_run):
    with pytest.raises(ValueError, match="expected int8"):
        export_onnx(trained_run, quantize="int4")
    with pytest.raises(ValueError, match="expected auto, dynamo or torchscript"):
        export_onnx(trained_run, exporter="tflite")
    with pytest.raises(FileNotFoundError, match="nnforge export"):
        load_engine(trained_run, backend="onnx")
