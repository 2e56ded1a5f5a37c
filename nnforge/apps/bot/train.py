"""Train a bot: the intent classifier (an ordinary nnforge text run), its out-of-scope threshold, the FAQ index.

    nnforge app bot train --intents intents.yaml --faq faq/ [--model minilm] [--out runs] [--name shop]
    python -c "from nnforge.apps.bot.train import train_bot; train_bot('intents.yaml', 'faq/', name='shop')"

The bot's folder, runs/bot/NAME:
    bot.json           the threshold and how it was calibrated (false accept / false reject rates), FAQ threshold,
                       the model, where every file came from
    intents.yaml       a copy: the bot answers from its folder alone
    data/              train.csv and val.csv: each intent's examples, HOLD_OUT of them held out (stratified, seeded)
    text/intents/      the intent classifier: `nnforge train text` on data/ (MiniLM fine-tuned by default)
    faq.json, faq_vectors.npy   the FAQ passages and their embeddings (the classifier's own features)
    tickets.db         hand-off tickets, written while the bot runs

The held-out examples pick the best epoch and calibrate the threshold, together with the file's out_of_scope
messages; the test file (`nnforge app bot evaluate`) is never seen here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from nnforge import api
from nnforge.apps.bot import EXAMPLE
from nnforge.apps.bot.calibrate import calibrate
from nnforge.apps.bot.faq import FaqIndex, passage_text, read_faq
from nnforge.apps.bot.intents import IntentSpec, read_intents

HOLD_OUT = 0.2  # share of each intent's examples held out (at least one)
DEFAULT_MODEL = "minilm"  # fine-tuned MiniLM: measured against fasttext and TF-IDF in benchmarks/apps.py
FAQ_FLOOR = 0.3  # the least fused score an FAQ passage needs, whatever the out-of-scope messages score
FAQ_OOS_QUANTILE = 0.9  # ... and more than nine in ten of the out-of-scope messages' best passages


def log(msg: str) -> None:
    print(f"bot: {msg}", file=sys.stderr, flush=True)


def split_examples(spec: IntentSpec, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held out) pairs of (text, intent): HOLD_OUT of each intent's examples, at least one, held out."""
    rng = random.Random(seed)
    train, held = [], []
    for name, intent in spec.intents.items():
        examples = list(intent.examples)
        rng.shuffle(examples)
        k = max(1, round(HOLD_OUT * len(examples)))
        held += [(t, name) for t in examples[:k]]
        train += [(t, name) for t in examples[k:]]
    return train, held


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["text", "label"])
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def faq_threshold(oos_scores: list[float]) -> float:
    """The FAQ's bar: at least FAQ_FLOOR, and above most out-of-scope messages' best passage."""
    if not oos_scores:
        return FAQ_FLOOR
    return float(max(FAQ_FLOOR, np.quantile(oos_scores, FAQ_OOS_QUANTILE)))


def train_bot(intents: str | Path | None = None, faq: str | Path | None = None, *, model: str = DEFAULT_MODEL,
              out: str | Path = "runs", name: str | None = None, example: bool = False, seed: int = 0,
              force: bool = False, **train_options) -> Path:
    """Train a bot into OUT/bot/NAME and return the folder. train_options: `nnforge train text` options (epochs,
    lr, ...); the model's recipe and the size rules choose the rest."""
    if example:
        intents, faq, name = intents or EXAMPLE / "intents.yaml", faq or EXAMPLE / "faq", name or "example"
    if intents is None:
        raise ValueError("--intents is required (or --example for the shipped online shop)")
    intents = Path(intents)
    spec = read_intents(intents)  # every mistake in the file is found before anything is written
    passages = read_faq(faq) if faq is not None else []
    folder = Path(out) / "bot" / (name or intents.stem)
    if folder.exists():
        if not force:
            raise FileExistsError(f"{folder} exists; pick another --name or pass --force to replace it")
        shutil.rmtree(folder)
    (folder / "data").mkdir(parents=True)
    try:
        return _train(spec, intents, faq, passages, folder, model, seed, train_options)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # a failed start leaves no half bot behind
        raise


def _train(spec: IntentSpec, intents: Path, faq, passages: list[dict], folder: Path, model: str, seed: int,
           train_options: dict) -> Path:
    t0 = time.perf_counter()
    shutil.copy2(intents, folder / "intents.yaml")
    train, held = split_examples(spec, seed)
    _write_csv(folder / "data" / "train.csv", train)
    _write_csv(folder / "data" / "val.csv", held)
    log(f"{len(spec.intents)} intents: {len(train)} examples to train on, {len(held)} held out; "
        f"{len(spec.out_of_scope)} out-of-scope messages; {len(passages)} FAQ passages")
    log(f"training the intent classifier ({model}) in {folder / 'text' / 'intents'}")
    run = api.train("text", data=str(folder / "data"), model=model, out=str(folder), name="intents",
                    test_split=0.0, seed=seed, **train_options)
    loaded = api.load(run.path)

    held_texts, held_labels = [t for t, _ in held], [y for _, y in held]
    p_held = loaded.predict_proba(held_texts)
    correct = [loaded.classes[int(k)] == y for k, y in zip(p_held.argmax(1), held_labels, strict=True)]
    p_oos = loaded.predict_proba(spec.out_of_scope) if spec.out_of_scope else np.zeros((0, len(loaded.classes)))
    cal = calibrate(p_held.max(1), p_oos.max(1))
    cal["held_out_accuracy"] = float(np.mean(correct))
    log(f"threshold {cal['threshold']:.3f} ({cal['method']}): false accept {cal['false_accept']:.1%} of "
        f"{cal['n_out_of_scope']} out-of-scope, false reject {cal['false_reject']:.1%} of {cal['n_in_scope']} held "
        f"out; held-out accuracy {cal['held_out_accuracy']:.1%}")

    card = {"model": str(run.path.relative_to(folder)), "model_name": loaded.name, "threshold": cal["threshold"],
            "calibration": cal, "faq": bool(passages), "faq_threshold": None,
            "intents": {"file": str(intents), "sha256": _sha256(intents), "count": len(spec.intents)},
            "examples": {"train": len(train), "held_out": len(held)}, "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if passages:
        vectors = loaded.embed([passage_text(p) for p in passages]).astype(np.float32)  # (N, D)
        (folder / "faq.json").write_text(json.dumps(passages, ensure_ascii=False, indent=1), encoding="utf-8")
        np.save(folder / "faq_vectors.npy", vectors, allow_pickle=False)
        index = FaqIndex(passages, vectors)
        oos_vectors = loaded.embed(spec.out_of_scope) if spec.out_of_scope else []
        best = [index.search(t, v, k=1)[0][0] for t, v in zip(spec.out_of_scope, oos_vectors, strict=True)]
        card["faq_threshold"] = faq_threshold(best)
        card["faq_source"] = str(faq)
        log(f"FAQ threshold {card['faq_threshold']:.3f} (at least {FAQ_FLOOR}, above {FAQ_OOS_QUANTILE:.0%} of the "
            "out-of-scope messages' best passages)")
    (folder / "bot.json").write_text(json.dumps(card, indent=2))
    log(f"ready in {time.perf_counter() - t0:.0f} s: {folder}")
    return folder
