"""DCGAN on Fashion-MNIST at 32x32: nnforge against the classic PyTorch DCGAN example pipeline, side by side.

    python benchmarks/gan.py --data data/fashion-mnist speed --repeats 3       # time per epoch (and FID), paired
    python benchmarks/gan.py --data data/fashion-mnist quality --epochs 5      # FID after the same epochs
    python benchmarks/gan.py --data data/fashion-mnist budget --minutes 10     # FID (and cdcgan consistency) in 10 min
    python benchmarks/gan.py --data data/fashion-mnist all                     # the three, one feature classifier
    python benchmarks/gan.py --data data/fashion-mnist modes RUN [RUN ...]     # FID of raw vs EMA G, 3 sampling modes

DATA is the PNG tree `python -m nnforge.data.fashion_mnist DATA` writes (train/ and test/ class folders).

The baseline is the PyTorch examples' dcgan/main.py as its authors wrote it, pointed at DATA/train: ImageFolder with
per-sample Resize/CenterCrop/ToTensor/Normalize transforms (plus Grayscale, so that both sides train the same
1-channel networks), DataLoader(batch 128, shuffle, its default 2 workers), the example's weights_init, BCELoss on a
Sigmoid discriminator, Adam 2e-4 (0.5, 0.999), its loop (D on real, D on fake, G), a log line per iteration, image
files of real and fixed-noise samples every 100 iterations, netG/netD saved every epoch. Its networks are nnforge's
DCGAN generator and discriminator at 32 px (the example's layer stack with one stage fewer), so both sides train
the same networks; nnforge runs `nnforge train gan` with its defaults (batch 128, EMA, channels-last, tensor cache).

Every FID here is "FID (nnforge features)": the features of one resnet_tiny classifier trained on DATA (3 epochs,
made once, or --features RUN), never comparable with Inception FID. The floor beside it is the same FID between
real test and real training images. Samples: nnforge's served generator (EMA, BatchNorm statistics re-estimated
for its weights); the baseline's netG as the example makes its samples (train mode, batch statistics).
Time per epoch is the training loop: nnforge's epoch_time_s (its end-of-epoch validation, the sample grid and
val_fid, comes after it), the baseline's loop over its DataLoader including its own image files every 100 steps.
Each side runs in its own process; peak memory is that process's max RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnforge.engine.run import Run  # noqa: E402
from nnforge.models.gan import Discriminator, Generator  # noqa: E402  (the same networks on both sides)

NZ, SIZE, WIDTH, BATCH = 128, 32, 64, 128  # nnforge's defaults; the example's nz is 100, its ngf/ndf 64


# ----------------------------------------------------------------------------------------------------------------
# the baseline: the PyTorch DCGAN example's pipeline and loop


def weights_init(m):  # the example's custom weights initialization called on netG and netD
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


def baseline_train(a) -> None:
    """The example's main.py, one process; prints one JSON line of timings at the end."""
    import torchvision.datasets as dset
    import torchvision.transforms as transforms
    import torchvision.utils as vutils

    deadline = a.deadline or float("inf")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)  # the example's manualSeed is 999
    dataset = dset.ImageFolder(root=a.data, transform=transforms.Compose([
        transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.Grayscale(), transforms.ToTensor(),
        transforms.Normalize((0.5,), (0.5,))]))
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2)
    netG = Generator(NZ, 1, SIZE, WIDTH)
    netG.apply(weights_init)
    netD = nn.Sequential(Discriminator(1, SIZE, WIDTH), nn.Sigmoid())
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    fixed_noise = torch.randn(64, NZ)
    real_label, fake_label = 1.0, 0.0
    optimizerD = torch.optim.Adam(netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
    epoch_s, iterations, stopped = [], 0, False
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        for i, data in enumerate(dataloader, 0):
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            netD.zero_grad()
            real_cpu = data[0]
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype)
            output = netD(real_cpu).view(-1)
            errD_real = criterion(output, label)
            errD_real.backward()
            D_x = output.mean().item()
            noise = torch.randn(batch_size, NZ)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach()).view(-1)
            errD_fake = criterion(output, label)
            errD_fake.backward()
            D_G_z1 = output.mean().item()
            errD = errD_real + errD_fake
            optimizerD.step()
            # (2) Update G network: maximize log(D(G(z)))
            netG.zero_grad()
            label.fill_(real_label)
            output = netD(fake).view(-1)
            errG = criterion(output, label)
            errG.backward()
            D_G_z2 = output.mean().item()
            optimizerG.step()
            print(f"[{epoch}/{a.epochs}][{i}/{len(dataloader)}] Loss_D: {errD.item():.4f} Loss_G: {errG.item():.4f} "
                  f"D(x): {D_x:.4f} D(G(z)): {D_G_z1:.4f} / {D_G_z2:.4f}")
            if i % 100 == 0:
                vutils.save_image(real_cpu, f"{out}/real_samples.png", normalize=True)
                fake = netG(fixed_noise)
                vutils.save_image(fake.detach(), f"{out}/fake_samples_epoch_{epoch:03d}.png", normalize=True)
            iterations += 1
            if time.time() >= deadline:
                stopped = True
                break
        epoch_s.append(time.perf_counter() - t0)
        torch.save(netG.state_dict(), f"{out}/netG.pth")  # the example keeps one file per epoch; one is enough here
        torch.save(netD.state_dict(), f"{out}/netD.pth")
        if stopped:
            break
    print(json.dumps({"epoch_s": epoch_s, "iterations": iterations, "images": len(dataset),
                      "stopped_by_deadline": stopped}))


# ----------------------------------------------------------------------------------------------------------------
# running both sides as processes


def run_process(cmd: list[str], budget_s: float | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one process; with budget_s, SIGTERM once that long has passed
    (nnforge then saves a checkpoint at the next step and exits 130)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=log, stderr=err, text=True)
        timer = threading.Timer(budget_s, p.send_signal, (signal.SIGTERM,)) if budget_s else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(p.pid, 0)  # the child's own peak RSS, which Popen.wait would not give
        if timer:
            timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        p.returncode = code
        log.seek(0)
        err.seek(0)
        stdout, stderr = log.read(), err.read()
    if code not in (0, 130):
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{stderr[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, stdout


def baseline(data: Path, out: Path, epochs: int, budget_s: float | None = None, seed: int = 999) -> dict:
    cmd = [sys.executable, __file__, "--data", str(data / "train"), "baseline-train", "--epochs", str(epochs),
           "--out", str(out), "--seed", str(seed)] + (["--deadline", str(time.time() + budget_s)] if budget_s else [])
    wall, rss, stdout = run_process(cmd)
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": wall, "rss_mb": rss, "dir": str(out)}


def nnforge_run(data: Path, out: Path, name: str, features: Path, epochs: int, budget_s: float | None = None,
                model: str = "dcgan", seed: int = 0) -> dict:
    cmd = [sys.executable, "-m", "nnforge.cli", "train", "gan", "--data", str(data), "--model", model,
           "--epochs", str(epochs), "--features", str(features), "--out", str(out), "--name", name,
           "--eval-samples", "2000", "--seed", str(seed)]
    wall, rss, _ = run_process(cmd, budget_s)
    rows = Run(out / "gan" / name).read_metrics()
    return {"epoch_s": [float(r["epoch_time_s"]) for r in rows], "val_fid": [float(r["val_fid"]) for r in rows],
            "wall_s": wall, "rss_mb": rss, "run": str(out / "gan" / name)}


def features_run(data: Path, out: Path) -> Path:
    path = out / "image" / "features"
    if not (path / "checkpoints" / "best.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "nnforge.cli", "train", "image", "--data", str(data), "--img-size",
                        str(SIZE), "--epochs", "3", "--out", str(out), "--name", "features"], check=True,
                       stdout=subprocess.DEVNULL)
    return path


# ----------------------------------------------------------------------------------------------------------------
# measuring both sides the same way


class Measure:
    """FID (nnforge features) of samples against N training images, and the floor (N test images), same N."""

    def __init__(self, data: Path, features: Path, n: int):
        from nnforge.config import GanConfig
        from nnforge.tasks.gan_features import Features, load_images, split_u8

        images = load_images(GanConfig(data=str(data), image_size=SIZE), log=lambda _: None)
        train, test = split_u8(images, "train"), split_u8(images, "test")
        self.n = min(n, len(train), len(test))
        g = torch.Generator().manual_seed(0)
        self.feats = Features(features)
        self.ref = self.feats.features(train[torch.randperm(len(train), generator=g)[:self.n]])
        self.floor = self.fid(self.feats.features(test[torch.randperm(len(test), generator=g)[:self.n]]))

    def fid(self, fake_features: torch.Tensor) -> float:
        from nnforge.tasks.gan_features import fid

        return fid(self.ref, fake_features)

    def of_u8(self, u8: torch.Tensor) -> float:
        return self.fid(self.feats.features(u8))

    @torch.no_grad()
    def of_generator(self, G: nn.Module) -> float:
        """FID of n samples of G in the mode it is in, batches of 128, z from seed 1."""
        from nnforge.outputs import to_uint8

        g = torch.Generator().manual_seed(1)
        u8 = [torch.from_numpy(to_uint8(G(torch.randn(BATCH, NZ, generator=g)).numpy())).permute(0, 3, 1, 2)
              for _ in range(-(-self.n // BATCH))]
        return self.of_u8(torch.cat(u8)[:self.n])

    def baseline(self, folder: str) -> float:
        """The example's netG as the example samples it: train mode (batch statistics)."""
        netG = Generator(NZ, 1, SIZE, WIDTH)
        netG.load_state_dict(torch.load(f"{folder}/netG.pth", weights_only=True))
        return self.of_generator(netG)

    @torch.no_grad()
    def nnforge(self, run: str, which: str = "last", classes: bool = False) -> dict:
        """nnforge's served generator (EMA), BatchNorm statistics re-estimated for its weights as validation does
        (a checkpoint written at SIGTERM has not had them yet); with classes, the cdcgan's class consistency."""
        import nnforge
        from nnforge.tasks.gan import standing_stats
        from nnforge.tasks.gan_eval import generate_u8

        loaded = nnforge.load(run, which=which)
        k = len(loaded.input.classes)
        standing_stats(loaded.model, loaded.input.z_dim, k, BATCH, 0, loaded.device)
        out = {"fid": self.of_u8(generate_u8(loaded, loaded.input.sample(self.n, seed=1)))}
        if classes:
            index = {c: i for i, c in enumerate(self.feats.classes)}
            per = {c: float((self.feats.logits(generate_u8(loaded, loaded.input.sample(self.n // k, c, seed=2)))
                             .argmax(1) == index[c]).float().mean()) for c in loaded.input.classes}
            out.update(class_consistency=statistics.mean(per.values()), per_class=per)
        return out


def paired(baseline_s: list[float], ours_s: list[float]) -> str:
    ratios = sorted(b / o for b, o in zip(baseline_s, ours_s, strict=True))
    return (f"median of {len(ratios)} paired ratios {statistics.median(ratios):.2f}x "
            f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")


# ----------------------------------------------------------------------------------------------------------------
# the three measurements


def cmd_speed(a, out: Path, features: Path, measure: Measure) -> None:
    """One epoch each, a.repeats interleaved pairs (alternating which goes first); each run's FID after its epoch
    (the quality at the same number of epochs, measured on every pair). Pair i seeds both sides anew (nnforge i, the
    baseline 999 + i: the example's seed for the first pair), so the FIDs show the spread over seeds."""
    from nnforge.config import GanConfig
    from nnforge.tasks.gan_features import load_images

    images = load_images(GanConfig(data=str(a.data), image_size=SIZE))  # checks and tensor cache before timing
    n_train = len(images.split_samples("train"))
    times: dict[str, list[float]] = {"baseline": [], "nnforge": []}
    rss: dict[str, list[float]] = {"baseline": [], "nnforge": []}
    fids: dict[str, list[float]] = {"baseline": [], "nnforge": []}
    for i in range(a.repeats):
        for side in (("baseline", "nnforge") if i % 2 == 0 else ("nnforge", "baseline")):
            if side == "baseline":
                r = baseline(a.data, out / f"baseline-speed-{i}", 1, seed=999 + i)
                fids[side].append(measure.baseline(r["dir"]))
            else:
                r = nnforge_run(a.data, out, f"speed-{i}", features, 1, seed=i)
                fids[side].append(measure.nnforge(r["run"])["fid"])
            times[side].append(r["epoch_s"][0])
            rss[side].append(r["rss_mb"])
        print(f"pair {i + 1}: baseline {times['baseline'][-1]:.1f} s/epoch (FID {fids['baseline'][-1]:.2f}), "
              f"nnforge {times['nnforge'][-1]:.1f} s/epoch (FID {fids['nnforge'][-1]:.2f})", flush=True)
    print(f"\n== time per training epoch, {n_train} images 32x32, batch {BATCH}, {a.repeats} interleaved pairs ==")
    for side in times:
        print(f"{side:9s} median {statistics.median(times[side]):7.1f} s/epoch  peak RSS {max(rss[side]):.0f} MB  "
              f"runs {[round(t, 1) for t in times[side]]}  FID after the epoch {[round(f, 2) for f in fids[side]]}")
    print(f"nnforge faster per epoch by: {paired(times['baseline'], times['nnforge'])}")
    print(f"FID (nnforge features) after one epoch: baseline median {statistics.median(fids['baseline']):.2f}, "
          f"nnforge median {statistics.median(fids['nnforge']):.2f}; floor {measure.floor:.2f} (real test vs real "
          f"training images, {measure.n} each)")


def cmd_quality(a, out: Path, features: Path, measure: Measure) -> None:
    """a.epochs epochs each, then FID (nnforge features) of both, the floor beside."""
    b = baseline(a.data, out / "baseline-quality", a.epochs)
    n = nnforge_run(a.data, out, "quality", features, a.epochs)
    fb, fn = measure.baseline(b["dir"]), measure.nnforge(n["run"])["fid"]
    print(f"\n== FID (nnforge features) after {a.epochs} epochs, {measure.n} samples vs {measure.n} training images ==")
    print(f"baseline {fb:8.2f}   ({sum(b['epoch_s']):.0f} s training, peak RSS {b['rss_mb']:.0f} MB)")
    print(f"nnforge  {fn:8.2f}   ({sum(n['epoch_s']):.0f} s training, peak RSS {n['rss_mb']:.0f} MB)")
    print(f"floor    {measure.floor:8.2f}   (real test vs real training images)")


def cmd_budget(a, out: Path, features: Path, measure: Measure) -> None:
    """Each side trains for a.minutes of wall time from its process start, then FID; and nnforge's cdcgan for the
    same budget, then its class consistency."""
    budget = 60 * a.minutes
    b = baseline(a.data, out / "baseline-budget", 1000, budget_s=budget)
    n = nnforge_run(a.data, out, "budget", features, 1000, budget_s=budget)
    c = nnforge_run(a.data, out, "budget-cdcgan", features, 1000, budget_s=budget, model="cdcgan")
    fb, fn, fc = measure.baseline(b["dir"]), measure.nnforge(n["run"]), measure.nnforge(c["run"], classes=True)
    print(f"\n== within {a.minutes:g} minutes of wall time per process, FID (nnforge features), {measure.n} samples ==")
    print(f"baseline {fb:8.2f}   after {b['iterations']} steps, peak RSS {b['rss_mb']:.0f} MB")
    print(f"nnforge  {fn['fid']:8.2f}   after {len(n['epoch_s'])} whole epochs and part of one, peak RSS "
          f"{n['rss_mb']:.0f} MB")
    print(f"cdcgan   {fc['fid']:8.2f}   class consistency {fc['class_consistency']:.2%} "
          f"({', '.join(f'{k} {v:.0%}' for k, v in fc['per_class'].items())})")
    print(f"floor    {measure.floor:8.2f}   (real test vs real training images)")


def cmd_modes(a, measure: Measure) -> None:
    """What nnforge's sampling choices are worth: FID of each run's raw and EMA generator (last checkpoint), sampled
    in train mode (batch statistics, as the example samples), in eval mode with the stored statistics, and in eval
    mode with statistics re-estimated for its weights (what nnforge serves)."""
    from nnforge.engine.checkpoint import load_checkpoint
    from nnforge.tasks.gan import standing_stats

    print(f"\n== FID (nnforge features), {measure.n} samples; floor {measure.floor:.2f} ==")
    for run in a.runs:
        tensors = load_checkpoint(run / "checkpoints" / "last.safetensors")[0]
        for module in ("generator", "generator_ema"):
            G = Generator(NZ, 1, SIZE, WIDTH)
            G.load_state_dict({k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")})
            fids = {}
            for mode in ("train", "eval-stored", "eval-standing"):
                if mode == "eval-standing":
                    standing_stats(G, NZ, 0, BATCH, 0, "cpu")
                fids[mode] = measure.of_generator(G.train(mode == "train"))
            print(f"{run.name:12s} {module:14s} " + "  ".join(f"{m} {f:.2f}" for m, f in fids.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, help="where runs go (default: a new temporary folder)")
    p.add_argument("--features", type=Path, help="a classifier run for FID (default: trained once on DATA)")
    p.add_argument("--samples", type=int, default=10000, help="samples (and real images) per FID")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--repeats", type=int, default=3)
    q = sub.add_parser("quality")
    q.add_argument("--epochs", type=int, default=5)
    bu = sub.add_parser("budget")
    bu.add_argument("--minutes", type=float, default=10.0)
    al = sub.add_parser("all")
    al.add_argument("--repeats", type=int, default=3)
    al.add_argument("--epochs", type=int, default=5)
    al.add_argument("--minutes", type=float, default=10.0)
    mo = sub.add_parser("modes", help="FID of raw vs EMA generator of nnforge runs, three sampling modes")
    mo.add_argument("runs", nargs="+", type=Path)
    bt = sub.add_parser("baseline-train", help="(internal) the example's training, one process")
    bt.add_argument("--epochs", type=int, default=1)
    bt.add_argument("--out", required=True)
    bt.add_argument("--seed", type=int, default=999, help="torch.manual_seed (the example's manualSeed: 999)")
    bt.add_argument("--deadline", type=float, help="time.time() at which to stop (budget runs)")
    a = p.parse_args()
    if a.cmd == "baseline-train":
        return baseline_train(a)
    out = a.out or Path(tempfile.mkdtemp(prefix="nnforge-gan-bench-"))
    features = a.features or features_run(a.data, out)
    print(f"runs in {out}; FID features from {features}", flush=True)
    measure = Measure(a.data, features, a.samples)
    if a.cmd == "modes":
        return cmd_modes(a, measure)
    if a.cmd in ("speed", "all"):
        cmd_speed(a, out, features, measure)
    if a.cmd in ("quality", "budget", "all"):
        if a.cmd in ("quality", "all"):
            cmd_quality(a, out, features, measure)
        if a.cmd in ("budget", "all"):
            cmd_budget(a, out, features, measure)


if __name__ == "__main__":
    main()
