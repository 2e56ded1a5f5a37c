"""Text classification with no flags: per-model recipes, data-size-aware defaults, the linear baseline beside every
run, the fasttext model, --model auto, and languages written without spaces.

    .venv/bin/pytest tests/test_text_defaults.py -q
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import yaml

import nnforge
from nnforge.config import ImageTrainConfig, TextTrainConfig, load_config
from nnforge.data.ngrams import NgramTokenizer
from nnforge.data.tokenizer import train_tokenizer
from nnforge.tasks import classify
from nnforge.tasks.classify import apply_recipe, size_defaults, user_fields

WORDS = {"pos": "brilliant moving superb funny charming".split(), "neg": "dull tedious awful clumsy boring".split()}
FILL = "the film story cast plot was quite a and really".split()


def reviews(path, n=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = ("pos", "neg")[i % 2]
        words = list(rng.choice(FILL, 4)) + list(rng.choice(WORDS[y], 2))
        rng.shuffle(words)
        rows.append(f'"{" ".join(words)}",{y}')
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# recipes and size-aware defaults


def test_a_pretrained_encoder_gets_its_recipe_and_the_user_still_wins():
    cfg = load_config(TextTrainConfig, overrides={"data": "x.csv", "model": "minilm"})
    notes = apply_recipe(cfg)
    assert (cfg.lr, cfg.batch_size, cfg.warmup_epochs, cfg.weight_decay) == (5e-5, 16, 0.1, 0.01)
    assert notes and "minilm's recipe" in notes[0] and "lr 5e-05" in notes[0]
    cfg = load_config(TextTrainConfig, overrides={"data": "x.csv", "model": "minilm", "lr": 3e-3, "batch_size": 8})
    notes = apply_recipe(cfg)
    assert (cfg.lr, cfg.batch_size, cfg.warmup_epochs) == (3e-3, 8, 0.1)  # set by the user: kept
    assert any(n.startswith("WARNING: --lr 0.003 is over 0.0003") for n in notes)


def test_batch_and_length_follow_the_data_size_and_large_sets_keep_their_defaults():
    small = load_config(TextTrainConfig, overrides={"data": "x.csv", "model": "bigru"})
    user = user_fields(small)
    apply_recipe(small, user)
    notes = size_defaults(small, 900, user)
    assert small.batch_size == 16 and small.epochs == 18 and small.early_stop == 4  # 57 steps/epoch, >= 1000 steps
    assert any("batch_size 16" in n for n in notes) and any("early_stop" in n for n in notes)
    chosen = load_config(TextTrainConfig, overrides={"data": "x.csv", "model": "bigru", "epochs": 3, "batch_size": 64})
    user = user_fields(chosen)
    apply_recipe(chosen, user)
    assert size_defaults(chosen, 900, user) == [] and (chosen.epochs, chosen.batch_size) == (3, 64)
    fmnist = load_config(ImageTrainConfig, overrides={"data": "x"})
    user = user_fields(fmnist)
    apply_recipe(fmnist, user)
    assert size_defaults(fmnist, 54_000, user) == [] and (fmnist.batch_size, fmnist.epochs) == (256, 10)


def test_the_chosen_defaults_are_printed_and_recorded(tmp_path, capsys):
    run = nnforge.train("text", data=str(reviews(tmp_path / "r.csv")), model="textcnn", out=str(tmp_path),
                        precision="fp32", vocab_size=200, max_len=24, test_split=0.0)
    err = capsys.readouterr().err
    assert "default: textcnn's recipe: lr 0.002, batch_size 64" in err and "default: batch_size 16" in err
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    assert cfg["batch_size"] == 16 and cfg["lr"] == 2e-3 and cfg["epochs"] > 10
    assert any("batch_size 16" in n for n in run.meta["defaults"])


# ----------------------------------------------------------------------------------------------------------------
# languages without spaces, the n-gram model, the baseline, auto


def test_chinese_text_is_cut_into_characters_not_kept_as_one_paragraph():
    text = "这部电影非常好看，演员的表演令人难忘。"
    for kind in ("bpe", "wordpiece"):
        # trained on the same sentences repeated: without a cut per character, merges would swallow whole phrases
        tok = train_tokenizer([text, "另一部电影很无聊"] * 5, kind, vocab_size=300)
        enc = tok.encode(text)
        hanzi = [sum(1 for ch in text[a:b] if "\u4e00" <= ch <= "\u9fff") for a, b in enc.offsets]
        assert max(hanzi) == 1 and sum(1 for h in hanzi if h) >= 17, (kind, enc.tokens, enc.offsets)
        assert "Ġ" not in enc.tokens  # no token of the spaces put between the characters
    words = NgramTokenizer().words("我喜欢这部电影 and it was great")
    assert words[:7] == ["我", "喜", "欢", "这", "部", "电", "影"] and words[-3:] == ["it", "was", "great"]


def test_ngram_ids_are_stable_and_saved_with_the_run(tmp_path):
    tok = NgramTokenizer(buckets=1000)
    ids = tok.encode("a great film").ids
    assert ids == NgramTokenizer(buckets=1000).encode("a great film").ids and 0 not in ids
    assert max(ids) <= 1000 and len(ids) == 3 + 2 + sum(len(f"<{w}>") - n + 1 for w in ("great", "film")
                                                          for n in (3, 4, 5) if len(f"<{w}>") >= n)
    tok.save(str(tmp_path / "t.json"))
    from nnforge.data.tokenizer import load_tokenizer

    again = load_tokenizer(tmp_path / "t.json", max_len=4)
    assert again.encode("a great film").ids == ids[:4] and again.encode("a great film").overflowing


def test_fasttext_learns_and_every_text_run_reports_the_linear_baseline(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    reviews(data / "train.csv", n=160, seed=0)
    reviews(data / "test.csv", n=40, seed=1)
    run = nnforge.train("text", data=str(data), model="fasttext", out=str(tmp_path), precision="fp32",
                        vocab_size=4097, epochs=15)
    report = json.loads((run.path / "eval" / "report.json").read_text())
    assert report["accuracy"] >= 0.9  # the planted words decide the label
    b = report["baseline"]
    assert b["n_test"] == 40 and 0.5 <= b["test_accuracy"] <= 1.0 and b["C"] in (1.0, 4.0, 16.0)
    assert b["neural_minus_baseline"] == pytest.approx(report["accuracy"] - b["test_accuracy"])
    assert "Linear baseline" in (run.path / "report.html").read_text()
    row = nnforge.load(run).predict(["a superb and charming film"], top_k=1)[0]  # served like any text model
    assert row["labels"] == ["pos"]


def test_auto_trains_the_candidates_and_keeps_the_best(tmp_path, monkeypatch):
    # the candidate list is configuration: two quick models here (the real one includes the pretrained encoder)
    monkeypatch.setattr(classify, "auto_candidates", lambda: ["fasttext", "textcnn"])
    data = tmp_path / "d"
    data.mkdir()
    reviews(data / "train.csv", n=120, seed=0)
    reviews(data / "test.csv", n=30, seed=1)
    run = nnforge.train("text", data=str(data), out=str(tmp_path), name="auto", precision="fp32", vocab_size=2049,
                        epochs=4)
    meta = run.meta
    results = meta["auto"]["candidates"]
    assert set(results) == {"fasttext", "textcnn"} and meta["auto"]["chose"] in results
    best = max(results, key=lambda n: results[n]["best"])
    assert meta["auto"]["chose"] == best == meta["model"]
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    assert cfg["model"] == best  # a resume trains the chosen model
    assert (run.path / "checkpoints" / "best.safetensors").is_file()
    assert not (run.path / "candidates" / best / "checkpoints").exists()  # moved, not copied
    assert (run.path / "candidates" / "textcnn" / "metrics.csv").is_file()
    assert json.loads((run.path / "eval" / "report.json").read_text())["accuracy"] > 0.5
    assert "Model choice" in (run.path / "report.html").read_text()
