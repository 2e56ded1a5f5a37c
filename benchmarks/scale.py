"""Tuning and data-parallel training on the CPU, measured (issue 17).

    python benchmarks/scale.py --data /tmp/fm tune --minutes 20        # Optuna within a budget vs the default recipe
    python benchmarks/scale.py --data /tmp/fm10k ddp --repeats 3        # 2 processes x 1 thread vs 1 process x 2

tune: `nnforge tune image` over lr, weight decay, width and epochs for a wall-clock budget, then the best trial's test
accuracy (from its own run's evaluation) beside the default recipe's (a plain `nnforge train image`, same data and
seed), with how many trials ran, finished and were pruned. ddp: the same training run (resnet_tiny, the global batch
unchanged) as one process with 2 threads and as 2 gloo processes with 1 thread each, interleaved repeats, fit()'s
wall time from metrics.csv (`elapsed_s`) and each run's final validation loss. On 2 cores the processes compete for
the same cores and pay an all-reduce per step: DDP may well lose here; the figure says by how much.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPACE = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "weight_decay": {"type": "float", "low": 1e-5, "high": 5e-2, "log": True},
         "model_args.width": {"type": "categorical", "choices": [16, 24]},
         "epochs": {"type": "int", "low": 4, "high": 8}}


def cli(*args, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "nnforge.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    if p.returncode:
        raise RuntimeError(f"nnforge {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return p


def cmd_tune(a) -> None:
    out = Path(a.out or tempfile.mkdtemp(prefix="nnforge-tune-"))
    space = out / "space.yaml"
    out.mkdir(parents=True, exist_ok=True)
    space.write_text(yaml.safe_dump(SPACE))
    t0 = time.perf_counter()
    cli("train", "image", "--data", a.data, "--out", out, "--name", "default", "--seed", a.seed)
    default_s = time.perf_counter() - t0
    default_acc = json.loads((out / "image" / "default" / "eval" / "report.json").read_text())["accuracy"]
    t0 = time.perf_counter()
    p = cli("tune", "image", "--data", a.data, "--space", space, "--trials", "1000", "--timeout", f"{a.minutes}m",
            "--study", "bench", "--out", out, "--seed", a.seed)
    tune_s = time.perf_counter() - t0
    summary = json.loads(p.stdout)
    best_acc = json.loads((Path(summary["run"]) / "eval" / "report.json").read_text())["accuracy"]
    print(f"\n== Optuna on {a.data}, {a.minutes} min budget, seed {a.seed} ==")
    print(f"default recipe: test accuracy {default_acc:.4f} ({default_s:.0f} s)")
    print(f"tuned: best trial {summary['best_trial']} ({summary['params']}), val {summary['best_value']:.4f}, "
          f"test accuracy {best_acc:.4f}; {summary['finished']} finished, {summary['pruned']} pruned, "
          f"{tune_s:.0f} s in all")
    print(f"study: {summary['report']}")


def _elapsed(run: Path) -> tuple[float, float]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return float(rows[-1]["elapsed_s"]), float(rows[-1]["val_loss"])


def cmd_ddp(a) -> None:
    out = Path(a.out or tempfile.mkdtemp(prefix="nnforge-ddp-"))
    common = ["train", "image", "--data", a.data, "--epochs", str(a.epochs), "--out", out, "--seed", "0"]
    cli(*common, "--name", "warm")  # the tensor cache, once
    one, two = [], []
    for i in range(a.repeats):
        for how in (("one", "two") if i % 2 == 0 else ("two", "one")):
            name = f"{how}-{i}"
            if how == "one":
                cli(*common, "--name", name, env={"OMP_NUM_THREADS": "2"})
                one.append(_elapsed(out / "image" / name))
            else:
                cli(*common, "--name", name, "--nproc", "2", env={"OMP_NUM_THREADS": "1"})
                two.append(_elapsed(out / "image" / name))
        print(f"repeat {i + 1}: 1 process {one[-1][0]:.1f} s, 2 processes {two[-1][0]:.1f} s", flush=True)
    ratios = sorted(o[0] / t[0] for o, t in zip(one, two, strict=True))
    print(f"\n== {a.epochs} epochs of resnet_tiny on {a.data}, global batch 256, {a.repeats} interleaved pairs ==")
    print(f"1 process x 2 threads: median fit() {statistics.median(o[0] for o in one):.1f} s, final val_loss "
          f"{[round(o[1], 4) for o in one]}")
    print(f"2 processes x 1 thread: median fit() {statistics.median(t[0] for t in two):.1f} s, final val_loss "
          f"{[round(t[1], 4) for t in two]}")
    print(f"speed-up of DDP (one / two): median of paired ratios {statistics.median(ratios):.2f} "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", help="keep runs here (default: a temporary folder)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tune")
    t.add_argument("--minutes", type=float, default=20)
    t.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("ddp")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    {"tune": cmd_tune, "ddp": cmd_ddp}[a.cmd](a)


if __name__ == "__main__":
    main()
