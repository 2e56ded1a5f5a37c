"""Evaluation layer: metrics against scikit-learn, the eval/ folder on real files, comparison, report.html."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from nnforge.evaluation.compare import compare_runs, format_comparison
from nnforge.evaluation.metrics import classification_metrics, format_classification_report, write_evaluation
from nnforge.evaluation.plots import plot_training_curves
from nnforge.evaluation.report import write_report


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _random_case(seed: int, n: int = 400, k: int = 7):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k - 1, n)  # the last class never occurs as a true label
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.2
    z[:, k - 2] -= 20  # class k-2 is (almost surely) never predicted: zero-division paths
    return y, _softmax(z)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_sklearn(seed):
    y, p = _random_case(seed)
    k = p.shape[1]
    classes = [f"c{i}" for i in range(k)]
    m = classification_metrics(y, p, classes, top_k=(1, 3, 5, 7, 9))
    pred = p.argmax(1)
    labels = list(range(k))

    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, c in enumerate(classes):
        assert m["per_class"][c]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][c]["recall"] == pytest.approx(rec[i])
        assert m["per_class"][c]["f1"] == pytest.approx(f1[i])
        assert m["per_class"][c]["support"] == sup[i]
        assert m["per_class_accuracy"][c] == pytest.approx(rec[i])
    for avg in ("macro", "weighted"):
        p_, r_, f_, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg,
                                                            zero_division=0)
        assert m[f"{avg}_avg"]["precision"] == pytest.approx(p_)
        assert m[f"{avg}_avg"]["recall"] == pytest.approx(r_)
        assert m[f"{avg}_avg"]["f1"] == pytest.approx(f_)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=labels), rel=1e-9)
    assert set(m["top_k_accuracy"]) == {"1", "3", "5"}  # only k < K
    for kk in (1, 3, 5):
        expected = skm.top_k_accuracy_score(y, p, k=kk, labels=labels)
        assert m["top_k_accuracy"][str(kk)] == pytest.approx(expected)
    expected_report = skm.classification_report(y, pred, labels=labels, target_names=classes, zero_division=0)
    assert format_classification_report(m) == expected_report
    json.loads(json.dumps(m))  # plain types only


def test_most_confused_pairs_ordered_by_count():
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([1, 1, 2, 1, 0, 2, 2, 2])  # a->b twice, a->c once, b->a once
    p = np.full((8, 3), 0.1)
    p[np.arange(8), pred] = 0.8
    m = classification_metrics(y, p, classes)
    assert m["most_confused"] == [{"true": "a", "pred": "b", "count": 2},
                                  {"true": "a", "pred": "c", "count": 1},
                                  {"true": "b", "pred": "a", "count": 1}]


def test_ece_on_a_hand_made_case():
    # two examples at confidence 0.9 (one right, one wrong) and two at 0.7 (both right):
    # ECE = 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.7| = 0.2 + 0.15
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.7, 0.3]])
    y = np.array([0, 1, 0, 0])
    m = classification_metrics(y, p, ["x", "y"])
    assert m["ece"] == pytest.approx(0.35)
    bins = m["reliability"]
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    hi = next(b for b in bins if b["lo"] < 0.9 <= b["hi"])
    lo = next(b for b in bins if b["lo"] < 0.7 <= b["hi"])
    assert (hi["count"], hi["confidence"], hi["accuracy"]) == (2, pytest.approx(0.9), 0.5)
    assert (lo["count"], lo["confidence"], lo["accuracy"]) == (2, pytest.approx(0.7), 1.0)
    assert all(b["confidence"] is None for b in bins if b["count"] == 0)
    # perfectly calibrated: 10 examples at 0.8 confidence, 8 of them right
    p = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert classification_metrics(y, p, ["x", "y"])["ece"] == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_name_the_problem():
    p = _softmax(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"probs: expected shape \(N, 2\)"):
        classification_metrics(np.zeros(4, int), p, ["a", "b"])
    with pytest.raises(ValueError, match=r"y_true\[2\] = 3"):
        classification_metrics(np.array([0, 1, 3, 0]), p, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not logits"):
        classification_metrics(np.zeros(4, int), np.ones((4, 3)) * 2.0, ["a", "b", "c"])
    with pytest.raises(ValueError, match="repeated"):
        classification_metrics(np.zeros(4, int), p, ["a", "b", "a"])
    with pytest.raises(ValueError, match="kind"):
        write_evaluation(Path("unused"), np.zeros(4, int), p, ["a", "b", "c"], ["x"] * 4, kind="audio")


def _png(path: Path, size: tuple[int, int], value: int, mode: str = "L") -> str:
    arr = np.full((size[1], size[0]) if mode == "L" else (size[1], size[0], 3), value, dtype=np.uint8)
    arr[0, 0] = 255 - value  # not a flat image: nearest-neighbour scaling keeps exactly two values
    Image.fromarray(arr).save(path)
    return str(path)


def test_write_evaluation_on_real_files(tmp_path):
    classes = ["ant", "<bee>", "cat & dog"]
    n = 9
    y = np.array([0, 1, 2] * 3)
    pred = np.array([1, 1, 2, 1, 1, 2, 2, 2, 1])  # wrong at 0, 3, 6, 7, 8
    p = np.full((n, 3), 0.05)
    p[np.arange(n), pred] = 0.9
    # odd rows: tiny 8x8 greyscale, even rows: 200x120 RGB
    items = [_png(tmp_path / f"img{i}.png", (8, 8) if i % 2 else (200, 120), 40 + 20 * i,
                  "L" if i % 2 else "RGB") for i in range(n)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    items[3] = str(broken)
    # row 6 has no file, only thumbnail bytes (as from a decoded-tensor cache); others fall back to the file
    thumbs: list[bytes | None] = [None] * n
    items[6] = "cache://row6"
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 200, 30)).save(buf, format="PNG")
    thumbs[6] = buf.getvalue()
    out = tmp_path / "eval"

    m = write_evaluation(out, y, p, classes, items, kind="image", split="val", worst_n=10, thumbnails=thumbs)

    for name in ("report.json", "classification_report.txt", "confusion_matrix.csv", "predictions.csv",
                 "misclassified.html", "mistakes.json", "confusion_matrix.png", "per_class_accuracy.png",
                 "reliability.png"):
        assert (out / name).is_file(), name
    for name in ("confusion_matrix.png", "per_class_accuracy.png", "reliability.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
    rep = json.loads((out / "report.json").read_text())
    assert rep["split"] == "val" and rep["n"] == n
    assert rep["accuracy"] == pytest.approx(4 / 9) == m["accuracy"]
    assert (out / "classification_report.txt").read_text() == format_classification_report(m)
    with (out / "confusion_matrix.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", *classes]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == m["confusion_matrix"]
    with (out / "predictions.csv").open() as f:
        preds = list(csv.DictReader(f))
    assert list(preds[0]) == ["index", "item", "true", "pred", "confidence", "loss"]
    assert len(preds) == n and preds[3]["item"] == str(broken) and preds[3]["pred"] == "<bee>"
    assert float(preds[0]["loss"]) == pytest.approx(-np.log(0.05), rel=1e-5)

    gallery = json.loads((out / "mistakes.json").read_text())["entries"]
    assert sorted(e["index"] for e in gallery) == [0, 3, 6, 7, 8]
    by_index = {e["index"]: e for e in gallery}
    assert by_index[3]["thumbnail"] is None  # unreadable: path only
    with Image.open(io.BytesIO(base64.b64decode(by_index[7]["thumbnail"]))) as tiny:  # 8x8 -> 96x96, nearest
        assert tiny.size == (96, 96) and {v for _, v in tiny.getcolors()} == {40 + 20 * 7, 255 - 40 - 20 * 7}
    with Image.open(io.BytesIO(base64.b64decode(by_index[0]["thumbnail"]))) as big:  # 200x120 -> 96x58
        assert max(big.size) == 96 and big.size[1] < 96
    with Image.open(io.BytesIO(base64.b64decode(by_index[6]["thumbnail"]))) as given:
        assert given.size == (96, 96) and given.getcolors() == [(96 * 96, (10, 200, 30))]
    page = (out / "misclassified.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "cache://row6" in page
    assert "broken.png" in page and "image could not be read" in page
    assert "&lt;bee&gt;" in page and "<bee>" not in page and "cat &amp; dog" in page


def test_gallery_holds_the_worst_mistakes_by_loss(tmp_path):
    classes = ["neg", "neu", "pos"]
    # rows 0-3 wrong with p(true) 0.30, 0.05, 0.20, 0.10; row 4 right but with a higher loss (p 0.34)
    p = np.array([[0.30, 0.60, 0.10], [0.05, 0.90, 0.05], [0.20, 0.10, 0.70], [0.10, 0.45, 0.45],
                  [0.34, 0.33, 0.33], [0.90, 0.05, 0.05]])
    y = np.array([0, 0, 0, 0, 0, 0])
    texts = ["plain", "<script>alert('x')</script>", "fish & chips", "a \"quoted\" one", "right", "easy"]
    write_evaluation(tmp_path, y, p, classes, texts, kind="text", worst_n=3)
    entries = json.loads((tmp_path / "mistakes.json").read_text())["entries"]
    assert [e["index"] for e in entries] == [1, 3, 2]  # highest loss first, the correct row 4 excluded
    assert [e["loss"] for e in entries] == sorted((e["loss"] for e in entries), reverse=True)
    page = (tmp_path / "misclassified.html").read_text()
    order = [page.index(s) for s in ("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;",
                                     "a &quot;quoted&quot; one", "fish &amp; chips")]
    assert order == sorted(order)
    assert "<script>" not in page and ">plain<" not in page  # row 0 is beyond worst_n
    assert "row 1" in page


def _evaluated_run(root: Path, name: str, correct_per_class: dict[str, int], n_per_class: int = 10) -> Path:
    """A run whose eval/ has exactly `correct_per_class[c]` right answers for class c (text kind: fast)."""
    classes = list(correct_per_class)
    y, pred = [], []
    for i, c in enumerate(classes):
        for j in range(n_per_class):
            y.append(i)
            pred.append(i if j < correct_per_class[c] else (i + 1) % len(classes))
    p = np.full((len(y), len(classes)), 0.1 / (len(classes) - 1))
    p[np.arange(len(y)), pred] = 0.9
    run = root / name
    write_evaluation(run / "eval", np.array(y), p, classes, [f"t{i}" for i in range(len(y))], kind="text")
    return run


def test_compare_runs_names_the_class_that_changed(tmp_path):
    a = _evaluated_run(tmp_path, "a", {"cat": 5, "dog": 8, "eel": 7})
    b = _evaluated_run(tmp_path, "b", {"cat": 9, "dog": 8, "eel": 3})
    d = compare_runs(a, b)
    # dog's own answers did not change, but fewer cats were called dogs: its precision and F1 rose too
    assert d["improved"] == ["dog", "cat"] and d["worse"] == ["eel"]  # largest F1 change first
    assert d["same_classes"] and d["only_a"] == [] and d["only_b"] == []
    assert d["metrics"]["accuracy"]["diff"] == pytest.approx(0.0)  # +4 cat, -4 eel
    assert d["per_class"]["cat"]["recall"]["diff"] == pytest.approx(0.4)
    assert d["per_class"]["dog"]["recall"]["diff"] == 0 and d["per_class"]["dog"]["precision"]["diff"] > 0
    assert set(d["metrics"]) == {"accuracy", "macro_f1", "weighted_f1", "ece", "nll"}  # K=3: no top-3
    text = format_comparison(d)
    assert "improved by more than 0.01: dog, cat" in text and "worse by more than 0.01: eel" in text
    json.dumps(d)

    c = _evaluated_run(tmp_path, "c", {"cat": 5, "dog": 8, "fox": 7})
    d = compare_runs(a, c, threshold=0.5)
    assert not d["same_classes"] and d["shared_classes"] == ["cat", "dog"]
    assert d["only_a"] == ["eel"] and d["only_b"] == ["fox"] and d["improved"] == d["worse"] == []
    assert "only in b: fox" in format_comparison(d)

    with pytest.raises(FileNotFoundError, match=r"run `nnforge evaluate .*empty` first"):
        compare_runs(a, tmp_path / "empty")


def _sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="(\w+)">(.*?)</section>', html, flags=re.S))


def test_report_with_missing_pieces_still_renders(tmp_path):
    run = tmp_path / "exp1"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"task": "image", "model": "m<1>", "classes": ["a", "b"]}))
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    html = write_report(run).read_text()
    sections = _sections(html)
    assert list(sections) == ["summary", "data", "curves", "metrics", "confusion", "calibration", "mistakes"]
    waiting = [sid for sid, body in sections.items() if "not available yet" in body]
    assert waiting == ["summary", "data", "curves", "metrics", "confusion", "calibration", "mistakes"]
    assert "config.yaml: expected a dict at the top level, got list" in sections["summary"]
    assert "m&lt;1&gt;" in sections["summary"] and "m<1>" not in html
    assert "could not be built" not in html

    # one epoch logged with only some columns: the curves appear, the rest still waits for evaluate
    (run / "metrics.csv").write_text("epoch,train_loss,lr\n1,2.3,0.001\n")
    sections = _sections(write_report(run).read_text())
    assert "not available yet" not in sections["curves"] and "data:image/png;base64," in sections["curves"]
    assert "not available yet" in sections["metrics"]
    assert (run / "eval" / "training_curves.png").is_file()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        write_report(tmp_path / "nope")


def test_training_curves_tolerate_missing_columns_and_blank_cells(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train_loss,val_acc,extra\n1,10,1.0,,x\n2,20,0.5,0.8,y\n")
    out = plot_training_curves(csv_path, tmp_path / "c.png", best_epoch=2)
    with Image.open(out) as im:
        assert im.format == "PNG" and len(im.convert("RGB").getcolors(1 << 16)) > 20
    csv_path.write_text("epoch,train_loss\n")
    with pytest.raises(ValueError, match="no rows"):
        plot_training_curves(csv_path, tmp_path / "d.png")
