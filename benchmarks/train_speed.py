"""Training speed on Fashion-MNIST as a PNG tree, side by side in one invocation.

    python benchmarks/train_speed.py --data data/fashion-mnist tutorial    # tutorial pipeline vs nnforge, seed_cnn
    python benchmarks/train_speed.py --data data/fm10k whole               # whole processes, seed tutorial vs nnforge
    python benchmarks/train_speed.py --data data/fashion-mnist engine      # nnforge loop vs a hand-written loop
    python benchmarks/train_speed.py --data data/fashion-mnist recipe --seeds 0 1 2 --epochs 6

tutorial: torchvision ImageFolder + per-sample ToTensor + DataLoader(batch 16) + the tutorial's SGD loop, against
`nnforge train image --model seed_cnn` with nnforge's defaults; one training epoch each (no evaluation in either),
plus achieved GFLOP/s against the CPU's peak. engine: the same model, the same in-memory batches, nnforge's `fit`
against a minimal loop doing the same arithmetic. recipe: the default model and recipe, test accuracy per seed and
wall time of the whole `train` call (cache warm). Peak memory is the process's max RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnforge.config import ImageTrainConfig  # noqa: E402
from nnforge.engine.device import autocast, cpu_has_fast_bf16  # noqa: E402
from nnforge.models import create_model  # noqa: E402


def max_rss_mb(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def cpu_peak_gflops() -> dict[str, float]:
    """Theoretical peaks for this machine's cores at the nominal clock (from /proc/cpuinfo)."""
    mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    cores = os.cpu_count() or 1
    ghz = mhz / 1000
    return {
        "clock_ghz": round(ghz, 2), "cores": cores,
        "fp32_avx2_fma": cores * ghz * 2 * 8 * 2,  # 2 FMA ports x 8 fp32 lanes x 2 flops
        "fp32_avx512_fma": cores * ghz * 2 * 16 * 2,
        "bf16_amx": cores * ghz * 1024 * 2 if cpu_has_fast_bf16() else 0.0,  # 1024 bf16 MACs/cycle/core
    }


def flops_per_image(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Forward + backward FLOPs per image, counted by torch's FlopCounterMode on a batch of 8."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, *shape)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 8


def tutorial_epoch(train_dir: Path, workers: int) -> dict:
    """The well-known tutorial's pipeline: ImageFolder, per-sample ToTensor/Normalize, batch 16, SGD 0.001/0.9."""
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    ds = torchvision.datasets.ImageFolder(str(train_dir), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    net = create_model("seed_cnn", num_classes=len(ds.classes), in_chans=1, img_size=28)
    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    t0 = time.perf_counter()
    n = 0
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        n += len(y)
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt}


def nnforge_epoch(data: Path, model: str, out: Path, epochs: int = 1, seed: int = 0, **kw) -> dict:
    """`nnforge train` in a subprocess; the epoch time is the training part only, from metrics.csv."""
    name = f"{model}-s{seed}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "nnforge.cli", "train", "image", "--data", str(data), "--model", model,
           "--epochs", str(epochs), "--seed", str(seed), "--out", str(out), "--name", name]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    import csv

    run = out / "image" / name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    report = json.loads((run / "eval" / "report.json").read_text())
    return {"wall_s": wall, "epoch_s": [float(r["epoch_time_s"]) for r in rows],
            "elapsed_s": [float(r["elapsed_s"]) for r in rows],
            "images_per_s": [float(r["examples_per_s"]) for r in rows], "test_acc": report["accuracy"],
            "val_acc": [float(r["val_acc"]) for r in rows], "run": str(run)}


def cmd_tutorial(a) -> None:
    """Training epochs side by side: the tutorial as written (DataLoader default num_workers=0), the tutorial with
    2 workers, and nnforge's epoch (from metrics.csv), interleaved a.repeats times."""
    out = Path(tempfile.mkdtemp(prefix="nnforge-bench-"))
    train_dir = Path(a.data) / "train"
    peaks = cpu_peak_gflops()
    fpi = flops_per_image(create_model("seed_cnn", num_classes=10, in_chans=1, img_size=28), (1, 28, 28))
    t0 = time.perf_counter()  # warm the tensor cache first: the nnforge epochs measure training, not the decode
    nnforge_epoch(Path(a.data), "seed_cnn", out, epochs=1, val_split=0.0)
    cold = time.perf_counter() - t0
    rates: dict[str, list[float]] = {"tutorial, 0 workers (as written)": [], "tutorial, 2 workers": [], "nnforge": []}
    for i in range(a.repeats):
        for name in rates:
            if name == "nnforge":
                rates[name].append(nnforge_epoch(Path(a.data), "seed_cnn", out, epochs=1, val_split=0.0)
                                   ["images_per_s"][0])
            else:
                rates[name].append(tutorial_epoch(train_dir, 0 if "0 workers" in name else 2)["images_per_s"])
        print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()), flush=True)
    print(f"\n== one training epoch of 60,000 Fashion-MNIST PNGs, seed_cnn, {a.repeats} interleaved repeats ==")
    for name, v in rates.items():
        print(f"{name:34s} median {statistics.median(v):6.0f} img/s  runs {[round(x) for x in v]}")
    for name in list(rates)[:2]:
        r = paired_summary(rates["nnforge"], rates[name])  # images/s: nnforge's over the tutorial's
        print(f"nnforge / {name}: median of {r['pairs']} paired ratios {r['median']:.2f}x "
              f"(range {r['min']:.2f}-{r['max']:.2f})")
    nn_rate = statistics.median(rates["nnforge"])
    print(f"first nnforge run incl. checking+decoding 60k PNGs into the cache: {cold:.1f} s wall")
    print(f"seed_cnn: {fpi / 1e6:.2f} MFLOP per image (forward+backward); nnforge achieves "
          f"{nn_rate * fpi / 1e9:.1f} GFLOP/s, {100 * nn_rate * fpi / 1e9 / peaks['fp32_avx2_fma']:.1f}% of the "
          f"fp32 AVX2 FMA peak ({peaks['fp32_avx2_fma']:.0f} GFLOP/s at {peaks['clock_ghz']} GHz x {peaks['cores']})")
    print(f"peak RSS: benchmark process {max_rss_mb():.0f} MB, largest child {max_rss_mb(True):.0f} MB")


def timed_process(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one whole process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def cmd_whole(a) -> None:
    """Whole processes side by side on one folder: the seed tutorial's script (benchmarks/seed_tutorial.py: start-up,
    ImageFolder, one epoch at batch 16) against `nnforge train image --model seed_cnn --epochs 1` with its defaults
    (start-up, file checks from the cache, 10% val and 10% test carved out, one epoch, validation, checkpoints, test
    evaluation, pictures, report.html), cache warm; interleaved pairs, alternating which goes first."""
    out = Path(tempfile.mkdtemp(prefix="nnforge-whole-"))
    tutorial = [sys.executable, str(ROOT / "benchmarks" / "seed_tutorial.py"), a.data]
    ours = [sys.executable, "-m", "nnforge.cli", "train", "image", "--data", a.data, "--model", "seed_cnn",
            "--epochs", "1", "--out", str(out)]
    timed_process(ours)  # warm the file checks and the tensor cache
    times: dict[str, list[float]] = {"tutorial": [], "nnforge": []}
    rss: dict[str, list[float]] = {"tutorial": [], "nnforge": []}
    for i in range(a.repeats):
        for name in (("tutorial", "nnforge") if i % 2 == 0 else ("nnforge", "tutorial")):
            wall, mb = timed_process(tutorial if name == "tutorial" else ours)
            times[name].append(wall)
            rss[name].append(mb)
        print(f"pair {i + 1}: tutorial {times['tutorial'][-1]:.2f} s, nnforge {times['nnforge'][-1]:.2f} s",
              flush=True)
    r = paired_summary(times["tutorial"], times["nnforge"])
    n = sum(1 for _ in Path(a.data).rglob("*.png"))
    print(f"\n== whole process on {n} PNGs, seed_cnn, one epoch, {a.repeats} interleaved pairs ==")
    for name in times:
        print(f"{name:9s} median {statistics.median(times[name]):.2f} s  peak RSS {max(rss[name]):.0f} MB  "
              f"runs {[round(t, 2) for t in times[name]]}")
    print(f"nnforge faster by: median of paired ratios {r['median']:.2f}x (IQR {r['q1']:.2f}-{r['q3']:.2f}, "
          f"range {r['min']:.2f}-{r['max']:.2f})")


class _Batches:
    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys

    def __len__(self):
        return len(self.xs)

    def epoch(self, epoch, start=0):
        yield from zip(self.xs[start:], self.ys[start:], strict=True)


def paired_summary(baseline: list[float], ours: list[float]) -> dict:
    """Median of the paired ratios baseline_i / ours_i (> 1: ours is faster) with their spread: identical runs on
    these machines vary by +-20%, so only pairs run back to back can resolve a few percent."""
    ratios = sorted(b / o for b, o in zip(baseline, ours, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "min": ratios[0], "max": ratios[-1],
            "pairs": len(ratios)}


def cmd_engine(a) -> None:
    """fit() vs a minimal loop: same model init, same batches, same optimizer settings and precision."""
    from nnforge.engine.device import resolve_precision
    from nnforge.engine.loop import Trainable, fit
    from nnforge.engine.optim import OptimSpec, build_optimizer
    from nnforge.engine.run import Run
    from nnforge.tasks.classify import classification_step

    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    steps, bs = a.steps, 256
    xs = [torch.randn(bs, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(steps)]
    ys = [torch.randint(0, 10, (bs,), generator=g) for _ in range(steps)]
    cfg = ImageTrainConfig(data="-", epochs=1, warmup_epochs=0.0, model=a.model)
    amp = resolve_precision(cfg.precision, device)

    def hand_loop() -> float:
        torch.manual_seed(0)
        model = create_model(a.model, num_classes=10, in_chans=1, img_size=28).to(memory_format=torch.channels_last)
        opt = build_optimizer(model, cfg)
        t0 = time.perf_counter()
        for x, y in zip(xs, ys, strict=True):
            with autocast(device, amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0

    def engine() -> float:
        torch.manual_seed(0)
        model = create_model(a.model, num_classes=10, in_chans=1, img_size=28)
        run = Run(tempfile.mkdtemp(prefix="nnforge-engine-"))
        trainable = Trainable(
            modules={"model": model}, optimizers={"model": OptimSpec.from_config(cfg)},
            step=lambda m, batch, ctx: classification_step(m, batch, ctx, None, cfg.label_smoothing),
            source=_Batches(xs, ys), validate=lambda m: {"val_acc": 0.0, "val_loss": 0.0},
            directions={"val_acc": "max", "val_loss": "min"})
        t0 = time.perf_counter()
        fit(trainable, cfg, run, device=device)
        return time.perf_counter() - t0

    hand_loop()  # warm-up: oneDNN builds its kernels on first use
    times = {"hand": [], "engine": []}
    for i in range(a.repeats):  # interleaved pairs, alternating which runs first, so drift hits both alike
        order = ("hand", "engine") if i % 2 == 0 else ("engine", "hand")
        for which in order:
            times[which].append(hand_loop() if which == "hand" else engine())
        print(f"pair {i + 1}: hand {times['hand'][-1]:.2f} s, engine {times['engine'][-1]:.2f} s, "
              f"ratio {times['hand'][-1] / times['engine'][-1]:.3f}", flush=True)
    h, e = statistics.median(times["hand"]), statistics.median(times["engine"])
    r = paired_summary(times["hand"], times["engine"])
    print(f"\n== nnforge fit() vs a hand-written loop: {a.model}, {steps} steps of {bs}, {amp or 'fp32'} ==")
    print(f"hand loop: median {h:.2f} s ({steps * bs / h:.0f} img/s)  runs {[round(t, 2) for t in times['hand']]}")
    print(f"engine:    median {e:.2f} s ({steps * bs / e:.0f} img/s)  runs {[round(t, 2) for t in times['engine']]}")
    print("engine time includes its once-per-epoch evaluation stub, metrics row and two checkpoint writes")
    print(f"throughput ratio engine / hand loop: median of {r['pairs']} paired ratios {r['median']:.3f} "
          f"(IQR {r['q1']:.3f}-{r['q3']:.3f}, range {r['min']:.3f}-{r['max']:.3f}); ratio of medians {h / e:.3f}")
    print(f"peak RSS {max_rss_mb():.0f} MB")


def cmd_recipe(a) -> None:
    out = Path(tempfile.mkdtemp(prefix="nnforge-recipe-"))
    nnforge_epoch(Path(a.data), "resnet_tiny", out, epochs=1, seed=99)  # warm the cache (decode once)
    res = []
    for seed in a.seeds:
        r = nnforge_epoch(Path(a.data), "resnet_tiny", out, epochs=a.epochs, seed=seed)
        res.append(r)
        print(f"seed {seed}: test acc {r['test_acc']:.4f}, wall {r['wall_s']:.0f} s, "
              f"epochs {[round(t) for t in r['epoch_s']]} s, val {[round(v, 4) for v in r['val_acc']]}", flush=True)
    accs = [r["test_acc"] for r in res]
    walls = [r["wall_s"] for r in res]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"\n== default recipe (resnet_tiny, {a.epochs} epochs), {len(accs)} seeds ==")
    print(f"test accuracy {100 * statistics.mean(accs):.2f} ± {100 * sd:.2f} %  "
          f"(per seed {[round(100 * x, 2) for x in accs]})")
    print(f"wall time per run {statistics.mean(walls):.0f} s (max {max(walls):.0f} s; budget 300 s)")
    print(f"peak RSS of the largest train process {max_rss_mb(True):.0f} MB")


# Recipes for the time-to-accuracy run: the default, then wider resnet_tiny nets with bigger batches, cheapest
# first. Overrides of `nnforge train image` (model_args takes KEY=VALUE like the --model-args flag).
TO_ACCURACY: dict[str, dict] = {
    "default-e7": {"epochs": 7},
    "w32-b512-e12": {"model_args": "width=32", "batch_size": 512, "epochs": 12, "lr": 4e-3, "weight_decay": 0.05},
    "w48-b512-e12": {"model_args": "width=48", "batch_size": 512, "epochs": 12, "lr": 4e-3, "weight_decay": 0.05},
    "w64-b512-e10": {"model_args": "width=64", "batch_size": 512, "epochs": 10, "lr": 4e-3, "weight_decay": 0.05},
    "w64-b512-e16": {"model_args": "width=64", "batch_size": 512, "epochs": 16, "lr": 4e-3, "weight_decay": 0.05},
    "w32-b512-e20": {"model_args": "width=32", "batch_size": 512, "epochs": 20, "lr": 4e-3, "weight_decay": 0.05},
}


def _overrides(text: str) -> dict:
    """'epochs=7;weight_decay=0.05' -> {'epochs': '7', 'weight_decay': '0.05'} (values go to the CLI as text)."""
    out = {}
    for part in filter(None, text.split(";")):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out


def cmd_to_accuracy(a) -> None:
    """Each recipe once, alone and in turn; reports test accuracy and the time fit() took (from metrics.csv)."""
    out = Path(a.out or tempfile.mkdtemp(prefix="nnforge-tta-"))
    recipes = {name: TO_ACCURACY[name] for name in a.recipes} if a.recipes is not None else dict(TO_ACCURACY)
    recipes.update({c: _overrides(c) for c in a.custom})
    if not a.no_warmup:
        t0 = time.perf_counter()
        nnforge_epoch(Path(a.data), "resnet_tiny", out, epochs=1, seed=99)  # warm the tensor cache (decode once)
        print(f"cache warm-up run: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for name, kw in recipes.items():
        kw = dict(kw)
        epochs = int(kw.pop("epochs", ImageTrainConfig.model_fields["epochs"].default))
        r = nnforge_epoch(Path(a.data), "resnet_tiny", out, epochs=epochs, seed=a.seed, **kw)
        hit = next((i + 1 for i, v in enumerate(r["val_acc"]) if v >= a.target), None)
        rows.append({"recipe": name, "overrides": kw, "epochs": epochs, **r, "val_epoch_at_target": hit})
        print(f"{name}: test {r['test_acc']:.4f}  fit {r['elapsed_s'][-1]:.1f} s  loops {sum(r['epoch_s']):.1f} s  "
              f"whole call {r['wall_s']:.1f} s  val {[round(v, 4) for v in r['val_acc']]}", flush=True)
    print(f"\n== time to {100 * a.target:.1f}% test accuracy, resnet_tiny recipes, seed {a.seed} ==")
    print("| recipe | epochs | test acc | fit() s | training loops s | whole `nnforge train` s | img/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['recipe']} {r['overrides'] or ''} | {r['epochs']} | {100 * r['test_acc']:.2f}% | "
              f"{r['elapsed_s'][-1]:.1f} | {sum(r['epoch_s']):.1f} | {r['wall_s']:.1f} | "
              f"{statistics.median(r['images_per_s']):.0f} |")
    hits = [r for r in rows if r["test_acc"] >= a.target]
    best = min(hits, key=lambda r: r["elapsed_s"][-1]) if hits else None
    print(f"fastest recipe at >= {100 * a.target:.1f}%: " +
          (f"{best['recipe']} in {best['elapsed_s'][-1]:.1f} s of fit()" if best else "none reached it"))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tutorial", help="training epochs: the tutorial as written, with 2 workers, and nnforge")
    t.add_argument("--repeats", type=int, default=3)
    w = sub.add_parser("whole", help="whole processes on --data (e.g. a 10,000-image folder of class folders)")
    w.add_argument("--repeats", type=int, default=5)
    e = sub.add_parser("engine")
    e.add_argument("--model", default="resnet_tiny")
    e.add_argument("--steps", type=int, default=60)
    e.add_argument("--repeats", type=int, default=10)
    r = sub.add_parser("recipe")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--epochs", type=int, default=6)
    ta = sub.add_parser("to-accuracy", help="time-to-accuracy of several recipes (meant for a GPU)")
    ta.add_argument("--target", type=float, default=0.94)
    ta.add_argument("--seed", type=int, default=0)
    ta.add_argument("--recipes", nargs="*", choices=list(TO_ACCURACY), help="default: all of TO_ACCURACY")
    ta.add_argument("--custom", nargs="*", default=[], help="extra recipes as 'key=value;key=value'")
    ta.add_argument("--out", help="keep the run folders here")
    ta.add_argument("--no-warmup", action="store_true", help="the tensor cache is already warm")
    ta.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}{gpu}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")
    commands = {"tutorial": cmd_tutorial, "whole": cmd_whole, "engine": cmd_engine, "recipe": cmd_recipe,
                "to-accuracy": cmd_to_accuracy}
    commands[a.cmd](a)


if __name__ == "__main__":
    main()
