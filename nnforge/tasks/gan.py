"""The GAN task: a folder of images in, a generator of new ones out (DCGAN, conditional DCGAN).

    nnforge train gan --data data/fashion-mnist [--model cdcgan] [--image-size 32] [--epochs 10]
    nnforge generate runs/gan/exp1 --n 64 --class sneaker --seed 7 --out grid.png

One step is the DCGAN paper's loop: update D on a real batch and a generated one, then update G through the
updated D (non-saturating or hinge loss), each with its own Adam. The engine does the rest: EMA of G (what
samples, evaluation, export and serving use), exact resume, SIGTERM and NaN stops, metrics.csv.

After every epoch the validation makes the same fixed-noise sample grid (samples/epoch_NNN.png, and
samples/progress.gif of all of them, so a person sees it improve) and a cheap FID (nnforge features) of
`fid_samples` samples against as many training images: val_fid, which picks the best checkpoint. Before the first
epoch the task gets its measuring stick (gan_features.py): the --features classifier, or one trained on the data.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nnforge.config import GanConfig
from nnforge.engine.loop import StepContext, Trainable
from nnforge.engine.optim import OptimSpec
from nnforge.engine.run import Run
from nnforge.engine.seeding import derived_generator, seed_everything
from nnforge.evaluation.grids import grid, save_gif, save_png
from nnforge.models import create_model
from nnforge.outputs import to_uint8
from nnforge.tasks.base import Built
from nnforge.tasks.gan_eval import evaluate_run
from nnforge.tasks.gan_features import (
    Features,
    diversity,
    ensure_features,
    fid,
    load_images,
    require_torchmetrics,
    split_u8,
)

SAMPLES_DIR = "samples"
FIXED_NOISE = "fixed_noise.safetensors"  # the grid's z (and classes), kept in the run so every epoch uses them
GRID_COLUMNS = 8
GRID_MAX_ROWS = 10  # a conditional grid shows one row per class, the first ten classes
STANDING_BATCHES = 8  # batches that re-estimate the served generator's BatchNorm statistics before sampling
# keys for derived_generator beside (seed, epoch, batch): noise streams that never collide with the data's
NOISE_KEY, FIXED_KEY, VAL_KEY, STANDING_KEY, REAL_KEY = 1, 2**20, 2**20 + 1, 2**20 + 2, 2**20 + 3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the losses and the step


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # -log D(x) - log(1 - D(G(z)))


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()  # -log D(G(z)): the non-saturating loss


def gan_step(models: dict[str, nn.Module], batch, ctx: StepContext, loss: str,
             conditional: bool) -> tuple[int, dict[str, torch.Tensor]]:
    x, y, z, y_fake = batch  # real images in [-1, 1] (B, C, S, S), their labels, noise (B, z_dim), fake labels
    G, D = models["generator"], models["discriminator"]
    y_real, y_gen = (y, y_fake) if conditional else (None, None)
    with ctx.autocast():
        fake = G(z, y_gen)
        real_score = D(x, y_real).float()
        fake_score = D(fake.detach(), y_gen).float()
    d_loss = discriminator_loss(loss, real_score, fake_score)
    ctx.update(d_loss, "d")
    D.requires_grad_(False)  # G's update needs gradients through D, not for D (nor stale ones left in D.grad)
    try:
        with ctx.autocast():
            gen_score = D(fake, y_gen).float()
        g_loss = generator_loss(loss, gen_score)
        ctx.update(g_loss, "g")
    finally:
        D.requires_grad_(True)
    if loss == "nonsaturating":  # D(x) and D(G(z)) as probabilities, as the DCGAN example prints them
        real_score, fake_score = torch.sigmoid(real_score), torch.sigmoid(fake_score)
    return len(x), {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "d_real": real_score.detach().mean(),
                    "d_fake": fake_score.detach().mean()}


class GanBatches:
    """The image batches of the data layer, with the step's noise and fake labels drawn from (seed, epoch, batch):
    a resumed run draws exactly what the uninterrupted one did."""

    def __init__(self, images, z_dim: int, num_classes: int, seed: int, device: torch.device):
        self.images, self.z_dim, self.num_classes, self.seed, self.device = images, z_dim, num_classes, seed, device

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, epoch: int, start: int = 0):
        for b, (x, y) in enumerate(self.images.epoch(epoch, start), start):
            g = derived_generator(self.seed, epoch, b, NOISE_KEY)
            z = torch.randn(len(x), self.z_dim, generator=g).to(self.device)
            y_fake = torch.randint(0, max(1, self.num_classes), (len(x),), generator=g).to(self.device)
            yield x, y, z, y_fake


# ----------------------------------------------------------------------------------------------------------------
# sampling from the generator during training


def latents(n: int, z_dim: int, num_classes: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n noise vectors, and for a conditional generator the classes in turn (0, 1, ..., K-1, 0, ...)."""
    z = torch.randn(n, z_dim, generator=g)
    return z, (torch.arange(n) % num_classes if num_classes else None)


@torch.no_grad()
def standing_stats(G: nn.Module, z_dim: int, num_classes: int, batch_size: int, seed: int, device) -> None:
    """Re-estimate G's BatchNorm statistics for its own weights (an EMA copy's weights never made the running
    averages it carries), as the mean over a few batches; then G is back in eval mode."""
    norms = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    G.train()
    g = derived_generator(seed, STANDING_KEY)
    for _ in range(STANDING_BATCHES):
        z, y = latents(batch_size, z_dim, num_classes, g)
        G(z.to(device), None if y is None else y[torch.randperm(len(y), generator=g)].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    G.eval()


@torch.no_grad()
def sample_u8(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None, device, batch: int = 500) -> torch.Tensor:
    """(N, C, S, S) uint8 samples, rounded exactly as a served PNG is."""
    out = []
    for i in range(0, len(z), batch):
        raw = G(z[i:i + batch].to(device), None if y is None else y[i:i + batch].to(device)).float().cpu().numpy()
        out.append(torch.from_numpy(to_uint8(raw)).permute(0, 3, 1, 2))  # NHWC -> NCHW
    return torch.cat(out)


def fixed_noise(run: Run, cfg: GanConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid's z, the same every epoch: made once from the seed, then read from RUN/samples/."""
    p = run.path / SAMPLES_DIR / FIXED_NOISE
    if p.is_file():
        t = load_file(str(p))
        return t["z"], t.get("y")
    rows = min(num_classes, GRID_MAX_ROWS) if num_classes else GRID_COLUMNS
    z = torch.randn(rows * GRID_COLUMNS, cfg.z_dim, generator=derived_generator(cfg.seed, FIXED_KEY))
    y = torch.arange(rows).repeat_interleave(GRID_COLUMNS) if num_classes else None  # one row per class
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"z": z, **({"y": y} if y is not None else {})}, str(p))
    return z, y


def write_grid(run: Run, u8: torch.Tensor, epoch: int) -> Path:
    """samples/epoch_NNN.png, and samples/progress.gif of every epoch's grid so far."""
    folder = run.path / SAMPLES_DIR
    scale = max(1, 64 // u8.shape[-1])  # small images enlarged (nearest neighbour) so the grid is readable
    path = save_png(grid(u8.permute(0, 2, 3, 1).numpy(), GRID_COLUMNS, scale=scale), folder / f"epoch_{epoch:03d}.png")
    frames = sorted(f for f in folder.glob("epoch_*.png") if int(f.stem.split("_")[1]) <= epoch)
    save_gif(frames, folder / "progress.gif")
    return path


# ----------------------------------------------------------------------------------------------------------------
# the task


def gan_models(cfg: GanConfig, channels: int, num_classes: int) -> tuple[nn.Module, dict, nn.Module, dict]:
    """(generator, its arguments, discriminator, its arguments) for cfg.model; model_args go to both."""
    extra = dict(cfg.model_args)
    clash = sorted(set(extra) & {"z_dim", "channels", "image_size", "num_classes", "spectral_norm"})
    if clash:
        raise ValueError(f"model_args: {', '.join(clash)} follow from the data and config; set them there instead")
    cond = {"num_classes": num_classes} if cfg.model == "cdcgan" else {}
    g_kwargs = {"z_dim": cfg.z_dim, "channels": channels, "image_size": cfg.image_size, **cond, **extra}
    d_kwargs = {"channels": channels, "image_size": cfg.image_size, "spectral_norm": cfg.spectral_norm, **cond,
                **{k: v for k, v in extra.items() if k != "embed_dim"}}  # the class embedding's size is G's
    return (create_model(f"{cfg.model}_generator", **g_kwargs), g_kwargs,
            create_model(f"{cfg.model}_discriminator", **d_kwargs), d_kwargs)


class GanTask:
    name = "gan"
    configs = {"gan": GanConfig}

    def build(self, cfg: GanConfig, run: Run, device: torch.device) -> Built:
        require_torchmetrics()
        data = load_images(cfg)
        conditional = cfg.model == "cdcgan"
        num_classes = len(data.classes) if conditional else 0
        run.write_json("data_report.json", data.report)
        run.write_json("split.json", data.split_record())
        seed_everything(cfg.seed)
        G, g_kwargs, D, d_kwargs = gan_models(cfg, data.channels, num_classes)  # a wrong option fails before the
        features_run = ensure_features(cfg, run, data)  # feature classifier (minutes) is trained
        seed_everything(cfg.seed)  # and the run continues from the seed, whatever that training drew
        feats = Features(features_run, device)
        serve = "generator_ema" if cfg.ema else "generator"

        train_u8 = split_u8(data, "train")
        pick = torch.randperm(len(train_u8), generator=derived_generator(cfg.seed, REAL_KEY))[:cfg.fid_samples]
        real_features = feats.features(train_u8[pick])
        val_z, val_y = latents(len(pick), cfg.z_dim, num_classes, derived_generator(cfg.seed, VAL_KEY))
        grid_z, grid_y = fixed_noise(run, cfg, num_classes)
        epoch_now = [0]

        def before_epoch(epoch: int, modules: dict[str, nn.Module]) -> None:
            epoch_now[0] = epoch + 1

        def validate(modules: dict[str, nn.Module]) -> dict[str, float]:
            G_s = modules[serve]
            standing_stats(G_s, cfg.z_dim, num_classes, cfg.batch_size, cfg.seed, device)
            write_grid(run, sample_u8(G_s, grid_z, grid_y, device), epoch_now[0])
            fake_features = feats.features(sample_u8(G_s, val_z, val_y, device))
            return {"val_fid": fid(real_features, fake_features),
                    "val_diversity": diversity(fake_features) / max(1e-12, diversity(real_features))}

        record = {"model": f"{cfg.model}_generator", "model_kwargs": g_kwargs, "module": serve,
                  "discriminator": {"model": f"{cfg.model}_discriminator", "model_kwargs": d_kwargs},
                  "io": {"verb": "generate",
                         "input": {"kind": "latent", "z_dim": cfg.z_dim,
                                   **({"classes": data.classes} if conditional else {})},
                         "output": {"kind": "image", "channels": data.channels, "size": cfg.image_size}},
                  "features_run": _relative(features_run, run.path)}
        optim = partial(OptimSpec.from_config, cfg)
        trainable = Trainable(
            modules={"generator": G, "discriminator": D},
            optimizers={"d": optim(("discriminator",)), "g": optim(("generator",))},
            step=partial(gan_step, loss=cfg.loss, conditional=conditional),
            source=GanBatches(data.train_source(device), cfg.z_dim, num_classes, cfg.seed, device),
            validate=validate, directions={"val_fid": "min", "val_diversity": "max"},
            ema={"generator_ema": "generator"}, before_epoch=before_epoch, meta=record)
        meta = {"input": "image", "classes": data.classes, "num_classes": len(data.classes),
                "conditional": conditional, "data_fingerprint": data.report.get("fingerprint"),
                "features_run": record["features_run"]}
        return Built(trainable, meta, evaluate_after=bool(len(data.split_samples("test"))))

    def evaluate(self, run: Run | str | Path, data: str | None = None, device: str = "auto",
                 features: str | None = None) -> dict:
        return evaluate_run(run.path if isinstance(run, Run) else Path(run), data, device, features)


def _relative(path: Path, root: Path) -> str:
    """A path inside the run as relative to it (the run folder can move), any other as an absolute path."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


TASK = GanTask()
