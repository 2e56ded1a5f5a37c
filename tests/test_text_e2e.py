"""Text runs end to end: train -> predict -> ONNX parity for every text model, the CLI, evaluate, resume.

    .venv/bin/pytest tests/test_text_e2e.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import builtin_models

import nnforge
from nnforge.cli import main
from nnforge.config import TextTrainConfig
from nnforge.data.text import TextData

ROOT = Path(__file__).resolve().parent.parent
WORDS = {"pos": "brilliant moving superb funny charming".split(), "neg": "dull tedious awful clumsy boring".split()}
FILL = "the film story cast plot was quite a and really".split()


def review(rng: np.random.Generator, label: str) -> str:
    words = list(rng.choice(FILL, 4)) + list(rng.choice(WORDS[label], 2))
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """A folder: train.csv (UTF-8 with a BOM, one ragged row, one empty text) and test.tsv in Latin-1."""
    root = tmp_path_factory.mktemp("reviews")
    rng = np.random.default_rng(0)
    train = ["text,label"] + [f'"{review(rng, lab)}",{lab}' for i in range(80) for lab in [("pos", "neg")[i % 2]]]
    train[5] = "a,ragged,row"
    train[9] = '"",neg'
    (root / "train.csv").write_bytes(("\n".join(train) + "\n").encode("utf-8-sig"))
    test = ["label\ttext"] + [f"{lab}\t{review(rng, lab)} café" for i in range(12) for lab in [("pos", "neg")[i % 2]]]
    (root / "test.tsv").write_bytes(("\n".join(test) + "\n").encode("latin-1"))
    return root


def train(data: Path, out: Path, model: str, **kw):
    args = {"epochs": 1, "batch_size": 16, "precision": "fp32", "vocab_size": 300, "max_len": 24, "lr": 3e-3,
            "val_split": 0.15, **kw}
    return nnforge.train("text", data=str(data), model=model, out=str(out), name=model, **args)


def export_and_check(pred, batches: list[list[str]], path: Path) -> float:
    """What the exporter does: trace with the preprocessor's example, dynamic batch and length, compare with ORT."""
    model = pred.model.cpu().eval()
    example = torch.from_numpy(pred.input.example(2))
    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for texts in batches:
        ids = pred.input.batch([pred.input.decode(t) for t in texts])
        got, ref = sess.run(None, {"input": ids})[0], pred.forward(ids)
        assert (got.argmax(1) == ref.argmax(1)).all()
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


@pytest.mark.parametrize("model", builtin_models("text"))
def test_train_predict_export_parity(reviews, tmp_path, model):
    # One file, no test split: evaluation (the same for every model, tested below) is left out to save time.
    kw = {"freeze_encoder": True, "max_len": 16, "lr": 1e-3} if model == "minilm" else {}
    run = train(reviews / "train.csv", tmp_path, model, test_split=0.0, **kw)
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["task"] == "classify" and meta["input"] == "text" and meta["classes"] == ["neg", "pos"]
    assert meta["io"]["input"]["pad_id"] == 0 and meta["io"]["output"] == {"kind": "probs", "classes": ["neg", "pos"]}
    assert (run.path / "tokenizer.json").is_file()

    pred = nnforge.load(run)
    texts = ["a superb and charming film", "dull, tedious and awful", "x"]
    rows = pred.predict(texts, top_k=2)
    probs = pred.predict_proba(texts)  # (3, 2), classes in meta order
    assert [r["input"] for r in rows] == texts
    for r, p in zip(rows, probs, strict=True):  # each row: the labels by falling probability, with those values
        order = np.argsort(-p, kind="stable")
        assert r["labels"] == [meta["classes"][j] for j in order]
        np.testing.assert_allclose(r["probs"], p[order], rtol=1e-6)
    # other batch sizes and lengths than the traced example's (2, T): the axes really are dynamic
    long = "the plot was really quite tedious and clumsy, awful"
    assert export_and_check(pred, [texts + [long] * 3, ["superb"]], tmp_path / "model.onnx") < 1e-4
    # embed: the vectors the head reads (one per text, the same alone as in a batch)
    vectors = pred.embed(texts)
    assert vectors.shape == (3, pred.model.head.in_features)
    np.testing.assert_allclose(pred.embed([texts[1]])[0], vectors[1], atol=1e-5)


def test_a_text_run_learns_and_reloads_with_the_same_tokens(reviews, tmp_path):
    run = train(reviews, tmp_path, "textcnn", epochs=4, tokenizer="wordpiece")
    report = json.loads((run.path / "data_report.json").read_text())
    assert report["encoding"] == {str(reviews / "test.tsv"): "latin-1", str(reviews / "train.csv"): "utf-8-sig"}
    assert {s["path"] for s in report["skipped"]} == {f"{reviews / 'train.csv'}:6", f"{reviews / 'train.csv'}:10"}
    assert sum(report["counts"]["test"].values()) == 12 and (run.path / "report.html").is_file()
    pred = nnforge.load(run)
    rows = pred.predict(["a superb, charming film", "a tedious and clumsy plot"], top_k=1)
    assert [r["labels"][0] for r in rows] == ["pos", "neg"]
    test_acc = json.loads((run.path / "eval" / "report.json").read_text())["accuracy"]
    assert test_acc >= 0.9
    # Tokenizer round trip: the run's saved tokenizer, reloaded, gives the ids training gave (re-tokenized here
    # from the run's own config, which also retrains the tokenizer: both must agree).
    cfg = TextTrainConfig(**yaml.safe_load((run.path / "config.yaml").read_text()))
    data = TextData.load(cfg, log=lambda *_: None)
    for text, ids in zip(data.items("test"), [data.ids[i] for i in data._index("test")], strict=True):
        assert pred.input.decode(text).tolist() == ids.tolist()
    # Evaluate on another labelled file (a JSON Lines file here): read with the run's column names.
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in
                               [("superb and moving", "pos"), ("boring, awful", "neg"), ("", "neg")]) + "\n")
    report = nnforge.evaluate(run, data=str(other))
    assert report["n"] == 2 and report["accuracy"] == 1.0  # the empty text was skipped, with a message


def test_resume_keeps_the_runs_tokenizer(reviews, tmp_path):
    run = train(reviews / "train.csv", tmp_path, "gru", tokenizer="wordpiece", test_split=0.0)
    tok_before = (run.path / "tokenizer.json").read_bytes()
    (run.path / "tokenizer.json").write_bytes(tok_before)  # untouched by a resume, byte for byte
    nnforge.train("text", resume=str(run.path), epochs=2)
    assert (run.path / "tokenizer.json").read_bytes() == tok_before
    lines = (run.path / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 3  # header + epochs 1 and 2


def test_cli_train_and_predict(reviews, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "nnforge.cli", "train", "text", "--data", str(reviews / "train.csv"),
           "--text-col", "text", "--label-col", "label", "--model", "textcnn", "--epochs", "1", "--batch-size", "16",
           "--vocab-size", "300", "--test-split", "0", "--out", str(tmp_path), "--name", "cli", "--precision", "fp32"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    run = Path(out.stdout.strip().splitlines()[-1])
    assert run == tmp_path / "text" / "cli" and (run / "tokenizer.json").is_file()
    assert "skipped 2 unusable rows" in out.stderr and "train.csv:6: expected 2 fields, got 3" in out.stderr
    # predict through the same command-line entry point, in this process: texts and a file of lines (@file)
    lines = tmp_path / "lines.txt"
    lines.write_text("a superb film\nthe plot was dull\n")
    assert main(["predict", str(run), "charming cast", f"@{lines}", "--output", str(tmp_path / "p.json")]) == 0
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [p["input"] for p in preds] == ["charming cast", "a superb film", "the plot was dull"]
