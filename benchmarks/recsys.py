"""MovieLens-100k under RecBole's protocol: nnforge's popularity, BPR, two-tower and SASRec side by side with RecBole's
own BPR on the same split, plus the cold-start slice; quality, training time and peak memory.

    python benchmarks/recsys.py                          # seeds 0 1 2, everything (about an hour on 2 quiet cores)
    python benchmarks/recsys.py --seeds 0 --no-recbole   # nnforge only
    python benchmarks/recsys.py --quick                  # 2 epochs each, seed 0: does it run? (a few minutes)

Data: ml-100k as RecBole's atomic files, from the recbole wheel's dataset_example folder (`pip install --no-deps
recbole`; read from its path, never imported by nnforge). Per seed, three settings share one invocation:

    main   RecBole's default protocol: each user's interactions split 8:1:1 at random, every item ranked for every
           user, training and validation items excluded, Recall@10 / NDCG@10 (and MRR@10, Hit@10) on the test split,
           the best epoch by validation. nnforge popularity, bpr and two_tower (cold_items 0) on nnforge's split;
           RecBole's BPR on the same split: nnforge's split.safetensors written out as RecBole atomic files
           (NAME.train.inter, .valid.inter, .test.inter: RecBole's benchmark_filename)
    cold   cold_items 0.1: a tenth of the items lose all their interactions to the cold slice; popularity, bpr and
           two_tower on the test split and on the cold slice (full ranking, and among the cold items only)
    seq    sasrec under leave-last-out (the sequential protocol), with popularity on the same split

Each system runs in a subprocess of its own, so its peak resident memory (ru_maxrss) is its own; the order of the
systems alternates between seeds (paired repeats). Times are whole runs: reading the data, the split, item text
embeddings (cached after the first seed), every epoch with its validation, the test evaluation.

RecBole 1.2.1 needs numpy<2 (its Config sets np.float_), which nnforge's environment does not have, so the first
run makes a venv of its own under .cache/recbole-venv: numpy<2, pandas and RecBole's small dependencies from PyPI,
recbole itself with --no-deps (ray is only for its hyper-parameter search), and PyTorch, SciPy and scikit-learn
shared with nnforge's venv through a .pth file. RecBole runs through its library API as its quick start does
(Config, create_dataset, data_preparation, BPR, Trainer.fit, Trainer.evaluate) with its default BPR config; it only
gets the data path, the split files, the seed, the CPU and no progress bars. Its best-model reload uses torch.load
on the checkpoint it has just written, which PyTorch >= 2.6 refuses by default (weights_only): the subprocess runs
with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1. RecBole's published ml-100k quick-start figures (Recall@10 0.2523, NDCG@10
0.292 under its own split) are printed for reference; RecBole on its own split runs too with --recbole-own-split.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECBOLE_VENV = ROOT / ".cache" / "recbole-venv"
RECBOLE_DEPS = ["numpy<2", "pandas", "colorlog==4.7.2", "colorama==0.4.4", "tabulate", "texttable", "thop", "plotly",
                "psutil"]
PUBLISHED = {"recall@10": 0.2523, "ndcg@10": 0.292}  # RecBole's quick start, BPR on ml-100k, its own split
NNFORGE = {  # config overrides per system; everything else is the model's recipe
    "popularity": {"model": "popularity"},
    "bpr": {"model": "bpr"},
    "two_tower": {"model": "two_tower"},
    "sasrec": {"model": "sasrec"},
}
QUICK_EPOCHS = 2


def ml100k() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the ML-100k files of the recbole wheel: pip install --no-deps recbole")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# ----------------------------------------------------------------------------------------------------------------
# children: one system per process


def child_nnforge(args) -> dict:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import nnforge

    cfg = {**NNFORGE[args.child], **json.loads(args.config)}
    t0 = time.perf_counter()
    run = nnforge.train("recsys", data=str(ml100k()), seed=args.seed, out=args.out, name=args.name, **cfg)
    seconds = time.perf_counter() - t0
    report = json.loads((run.path / "eval" / "report.json").read_text())
    rows = run.read_metrics()
    return {"run": str(run.path), "seconds": seconds, "epochs": len(rows), "peak_mb": peak_mb(),
            "slices": {s: by_model[report["model"]] for s, by_model in report["slices"].items()},
            "popularity": {s: by_model.get("popularity") for s, by_model in report["slices"].items()}}


def child_recbole(args) -> dict:
    """RecBole's BPR through its library API, on split files (or on its own split of ml-100k)."""
    import logging

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model import general_recommender
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    t0 = time.perf_counter()
    extra = json.loads(args.config)
    model_name = extra.pop("model", "BPR")  # BPR; Pop cross-checks the protocol (nnforge's popularity: the same)
    given = {"seed": args.seed, "use_gpu": False, "show_progress": False, "state": "WARNING",
             "checkpoint_dir": str(Path(args.out) / "saved"), "topk": [10],
             "metrics": ["Recall", "MRR", "NDCG", "Hit", "Precision"], **extra}
    if args.split_dir:
        given.update(data_path=args.split_dir, benchmark_filename=["train", "valid", "test"],
                     load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]})
        dataset_name = "ml-100k-nnforge"
    else:
        given.update(data_path=str(ml100k().parent))
        dataset_name = "ml-100k"
    config = Config(model=model_name, dataset=dataset_name, config_dict=given)
    init_seed(config["seed"], config["reproducibility"])
    logging.getLogger().setLevel(logging.WARNING)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = getattr(general_recommender, model_name)(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    if model_name == "BPR":  # the best model's vectors, for nnforge's metrics to score (a check of the protocol)
        import numpy as np

        np.savez(Path(args.out) / "recbole_bpr.npz", users=model.user_embedding.weight.detach().numpy(),
                 items=model.item_embedding.weight.detach().numpy(),
                 user_ids=np.asarray(dataset.field2id_token["user_id"], dtype=str),
                 item_ids=np.asarray(dataset.field2id_token["item_id"], dtype=str))
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_mb(), "epochs": len(trainer.train_loss_dict),
            "best_valid": {k.lower(): float(v) for k, v in best_valid.items()},
            "slices": {"test": {k.lower(): float(v) for k, v in test.items()}}}


# ----------------------------------------------------------------------------------------------------------------
# the parent: split files for RecBole, subprocesses, the table


def write_recbole_split(run: Path, folder: Path) -> Path:
    """nnforge's split of the run as RecBole benchmark files (ids as in ml-100k; ratings and times as read)."""
    sys.path.insert(0, str(ROOT))
    from nnforge.data.interaction_splits import TEST, TRAIN, VALID, load_split
    from nnforge.data.interactions import read_interactions

    split = load_split(run)
    inter = read_interactions(ml100k(), log=lambda m: None)
    if inter.user_ids != split.header["user_ids"] or inter.item_ids != split.header["item_ids"]:
        raise SystemExit(f"{run}: its split does not index ml-100k as read now")
    name = "ml-100k-nnforge"
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    head = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    for part, code in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        rows = [f"{inter.user_ids[u]}\t{inter.item_ids[i]}\t{r:g}\t{t:.0f}\n" for u, i, r, t, p in
                zip(split.users, split.items, inter.ratings, inter.times, split.part, strict=True) if p == code]
        (out / f"{name}.{part}.inter").write_text(head + "".join(rows))
    return folder


def nnforge_metrics_of_recbole(run: Path, vectors: Path) -> dict:
    """nnforge's full-ranking metrics on RecBole's trained BPR vectors and nnforge's split: the same numbers as
    RecBole's own evaluation when the two protocols agree."""
    import numpy as np
    import torch

    from nnforge.data.interaction_splits import TEST, TRAIN, VALID, load_split
    from nnforge.evaluation.ranking import ranking_metrics

    split = load_split(run)
    z = np.load(vectors, allow_pickle=False)
    rows_u = {t: i for i, t in enumerate(z["user_ids"])}
    rows_i = {t: i for i, t in enumerate(z["item_ids"])}
    users = torch.from_numpy(z["users"][[rows_u[u] for u in split.header["user_ids"]]])
    known = [i for i in split.header["item_ids"] if i in rows_i]  # items only in the cold slice are not RecBole's
    if len(known) != split.num_items:
        raise SystemExit("RecBole's catalogue differs from nnforge's; use the main setting (no cold items)")
    items = torch.from_numpy(z["items"][[rows_i[i] for i in known]])
    return ranking_metrics(lambda u: users[u] @ items.T, np.arange(split.num_users), split.csr(TEST),
                           split.csr(TRAIN, VALID), split.num_items, ks=(10,))


def recbole_python() -> Path:
    py = RECBOLE_VENV / "bin" / "python"
    if py.is_file():
        return py
    print(f"making {RECBOLE_VENV} for RecBole (numpy<2; PyTorch shared with this venv) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(RECBOLE_VENV)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    import sysconfig

    # appended after the venv's own packages: its numpy<2 wins, torch/scipy/sklearn come from nnforge's venv
    (Path(site) / "zz_nnforge_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + RECBOLE_DEPS, check=True)
    subprocess.run(pip + ["--no-deps", "recbole==1.2.1"], check=True)
    return py


def run_child(python: Path, system: str, seed: int, out: Path, name: str, config: dict | None = None,
              split_dir: Path | None = None, env: dict | None = None) -> dict:
    cmd = [str(python), __file__, "--child", system, "--seed", str(seed), "--out", str(out), "--name", name,
           "--config", json.dumps(config or {})] + (["--split-dir", str(split_dir)] if split_dir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{system} (seed {seed}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs per model, first seed only")
    p.add_argument("--no-recbole", action="store_true", help="skip RecBole's BPR")
    p.add_argument("--recbole-own-split", action="store_true", help="also run RecBole's BPR on its own split")
    p.add_argument("--settings", nargs="+", default=["main", "cold", "seq"], choices=["main", "cold", "seq"])
    p.add_argument("--out", help="JSON results file (default: none)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--split-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = child_recbole(a) if a.child == "recbole" else child_nnforge(a)
        print(json.dumps(result))
        return

    seeds = a.seeds[:1] if a.quick else a.seeds
    quick = {"epochs": QUICK_EPOCHS} if a.quick else {}
    recbole = None if a.no_recbole else recbole_python()
    work = Path(tempfile.mkdtemp(prefix="nnforge-recsys-bench-"))
    plan = {"main": [("popularity", {"cold_items": 0.0}), ("bpr", {"cold_items": 0.0, **quick}),
                     ("two_tower", {"cold_items": 0.0, **quick})],
            "cold": [("popularity", {"cold_items": 0.1}), ("bpr", {"cold_items": 0.1, **quick}),
                     ("two_tower", {"cold_items": 0.1, **quick})],
            "seq": [("sasrec", {"cold_items": 0.0, **quick})]}
    results: dict = {s: {} for s in a.settings}
    for n, seed in enumerate(seeds):
        for setting in a.settings:
            systems = plan[setting][::-1] if n % 2 else plan[setting]  # paired repeats, alternating order
            for system, cfg in systems:
                name = f"{setting}-{system}-s{seed}"
                r = run_child(Path(sys.executable), system, seed, work, name, cfg)
                results[setting].setdefault(system, []).append(r)
                print(f"[{setting} seed {seed}] {system}: " + ", ".join(
                    f"{k} {r['slices']['test'][k]:.4f}" for k in ("recall@10", "ndcg@10"))
                      + f", {r['seconds']:.0f}s, {r['epochs']} epochs, peak {r['peak_mb']:.0f} MB", file=sys.stderr)
            if setting == "main" and recbole is not None:
                pop_run = Path(results["main"]["popularity"][-1]["run"])
                split_dir = write_recbole_split(pop_run, work / f"recbole-split-s{seed}")
                env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": ""}
                r = run_child(recbole, "recbole", seed, work / f"recbole-s{seed}", "recbole", quick,
                              split_dir=split_dir, env=env)
                vectors = work / f"recbole-s{seed}" / "recbole_bpr.npz"
                r["nnforge_metrics"] = nnforge_metrics_of_recbole(pop_run, vectors)
                results["main"].setdefault("recbole_bpr", []).append(r)
                mine = r["nnforge_metrics"]
                print(f"[main seed {seed}] RecBole BPR: recall@10 {r['slices']['test']['recall@10']:.4f}, ndcg@10 "
                      f"{r['slices']['test']['ndcg@10']:.4f} (nnforge's evaluation of its vectors: "
                      f"{mine['recall@10']:.4f}, {mine['ndcg@10']:.4f}), {r['seconds']:.0f}s, peak "
                      f"{r['peak_mb']:.0f} MB", file=sys.stderr)
                if a.recbole_own_split:
                    r = run_child(recbole, "recbole", seed, work / f"recbole-own-s{seed}", "recbole", quick, env=env)
                    results["main"].setdefault("recbole_bpr_own_split", []).append(r)
    report(results, seeds, a)
    if a.out:
        Path(a.out).write_text(json.dumps({"seeds": seeds, "quick": a.quick, "machine": platform.platform(),
                                           "cpus": os.cpu_count(), "results": results}, indent=2))


def report(results: dict, seeds: list[int], a) -> None:
    print(f"\nMovieLens-100k, seeds {seeds}{' (quick: ' + str(QUICK_EPOCHS) + ' epochs)' if a.quick else ''}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| setting | system | slice | Recall@10 | NDCG@10 | MRR@10 | time (s) | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, by_system in results.items():
        if "popularity" not in by_system and by_system:  # the baseline each run evaluates on its own split
            first = next(iter(by_system.values()))
            by_system = {"popularity (same split)": [{"slices": r["popularity"]} for r in first], **by_system}
        for system, runs in by_system.items():
            for slice_name in runs[0]["slices"]:
                vals = {k: [r["slices"][slice_name].get(k) for r in runs] for k in ("recall@10", "ndcg@10",
                                                                                    "mrr@10")}
                timed = "seconds" in runs[0]  # the baseline inside another run has no time of its own
                seconds = f"{statistics.mean(r['seconds'] for r in runs):.0f}" if timed else "-"
                peak = f"{max(r['peak_mb'] for r in runs):.0f}" if timed else "-"
                print(f"| {setting} | {system} | {slice_name} | {mean_std(vals['recall@10'])} | "
                      f"{mean_std(vals['ndcg@10'])} | {mean_std(vals['mrr@10'])} | {seconds} | {peak} |")
    main = results.get("main", {})
    if "bpr" in main and "recbole_bpr" in main:
        ratio = statistics.mean(a["seconds"] for a in main["bpr"]) / statistics.mean(
            b["seconds"] for b in main["recbole_bpr"])
        print(f"\nnnforge BPR / RecBole BPR whole-run time: {ratio:.2f}x (same split, same machine, interleaved)")
    print(f"RecBole's published quick-start BPR on ml-100k (its own split): Recall@10 {PUBLISHED['recall@10']}, "
          f"NDCG@10 {PUBLISHED['ndcg@10']}")


if __name__ == "__main__":
    main()
