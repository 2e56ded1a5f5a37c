"""What a GAN learns from and is measured with: its images in [-1, 1], and the features of an nnforge classifier.

    data = load_images(cfg)                                # ImageData: classification's layouts, checks and cache
    path = ensure_features(cfg, run, data)                 # --features RUN, or one trained into RUN/image/features
    feats = Features(path, device)
    fid(feats.features(real_u8), feats.features(fake_u8))  # "FID (nnforge features)"

Why a classifier of our own: FID is defined on Inception-v3 features, and those weights cannot be downloaded here.
A small classifier trained on the same images gives features that know what matters in this data (a sleeve, a
heel); FID, KID and precision/recall computed in them rank generators the same way within one data set, but their
values are on another scale than Inception FID and must never be compared with published numbers. Every figure is
labelled "FID (nnforge features)" and stands beside its floor: the same distance between real training and real
test images. Data without classes trains the classifier on a stand-in task: which way each image was rotated.
"""

from __future__ import annotations

import csv
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnforge.config import GanConfig, ImageTrainConfig
from nnforge.data.cache import TensorCache
from nnforge.engine.run import Run

FEATURES_SUBDIR = Path("image") / "features"  # where train_run puts an image run named "features" inside RUN
FEATURE_MODEL = "resnet_tiny"
ROTATION_SOURCES = 5000  # images rotated 4 ways for the stand-in task of unlabelled data (20,000 files at most)
SYMMETRIC = ([0.5], [0.5])  # (x/255 - 0.5) / 0.5: pixels in [-1, 1], what the generator's tanh produces


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_torchmetrics() -> None:
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise RuntimeError("GAN metrics (FID, KID) need torchmetrics: pip install 'nnforge[gan]'") from None


# ----------------------------------------------------------------------------------------------------------------
# the images


def image_config(cfg: GanConfig, **changes) -> ImageTrainConfig:
    """The image-data options of a GAN config, as classification's data layer takes them: the tensor cache, no
    crops (a GAN must see whole images), flips only if asked."""
    values = dict(data=cfg.data, img_size=cfg.image_size, path_col=cfg.path_col, label_col=cfg.label_col,
                  val_split=cfg.val_split, test_split=cfg.test_split, min_size=cfg.min_size, flip=cfg.flip,
                  crop_pad=0, cache="tensor", cache_dir=cfg.cache_dir, cache_max_gb=cfg.cache_max_gb,
                  workers=cfg.workers, batch_size=cfg.batch_size, seed=cfg.seed, sampler="shuffle")
    return ImageTrainConfig(**{**values, **changes})


def load_images(cfg: GanConfig, log=_log):
    """ImageData in [-1, 1]; classes are required for cdcgan, optional for dcgan (a flat folder is one class)."""
    from nnforge.data.images import ImageData

    icfg = image_config(cfg)
    data = ImageData.load(icfg, TensorCache(icfg.cache_dir, int(icfg.cache_max_gb * 2**30)), log=log,
                          min_classes=2 if cfg.model == "cdcgan" else 1)
    data.set_normalisation(*SYMMETRIC, "[-1, 1]")
    return data


def split_u8(data, split: str) -> torch.Tensor:
    """(N, C, S, S) uint8 images of a split, from the tensor cache."""
    rows = [data.row_of[s.path] for s in data.split_samples(split)]
    return data.tensors[torch.tensor(rows, dtype=torch.long)] if rows else data.tensors[:0]


# ----------------------------------------------------------------------------------------------------------------
# the classifier whose features measure


class Features:
    """An nnforge image classifier as the measuring stick: uint8 images (N, C, H, W) -> (N, D) features before its
    head, or its logits. Images of another size or channel count are converted the same way for real and fake."""

    def __init__(self, run_path: str | Path, device: str | torch.device = "cpu"):
        from nnforge.inference import Loaded

        self.path = Path(run_path)
        if not (self.path / "checkpoints" / "best.safetensors").is_file():
            raise FileNotFoundError(f"{self.path}: no checkpoints/best.safetensors; --features needs a trained "
                                    "nnforge image classifier run")
        self.loaded = Loaded(self.path, device=str(device))
        io = self.loaded.io
        if io["input"].get("kind") != "image" or io["output"].get("kind") != "probs":
            raise ValueError(f"{self.path}: takes {io['input'].get('kind')} inputs and gives {io['output'].get('kind')}"
                             "; FID needs an nnforge image classifier run (nnforge train image)")
        spec = io["input"]
        self.size, self.channels, self.device = int(spec["size"]), int(spec["channels"]), self.loaded.device
        self.mean = torch.tensor(spec["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.classes = self.loaded.classes

    def _inputs(self, u8: torch.Tensor) -> torch.Tensor:
        x = u8.to(self.device).float().div_(255)
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.loaded.channels_last else x

    @torch.no_grad()
    def _run(self, fn, u8: torch.Tensor, batch: int) -> torch.Tensor:
        out = [fn(self._inputs(u8[i:i + batch])).double().cpu() for i in range(0, len(u8), batch)]
        return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)

    def features(self, u8: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """(N, D) float64 on the CPU."""
        return self._run(self.loaded.model.forward_features, u8, batch)

    def logits(self, u8: torch.Tensor, batch: int = 512) -> torch.Tensor:
        return self._run(self.loaded.model, u8, batch)


def ensure_features(cfg: GanConfig, run: Run, data, log=_log) -> Path:
    """The classifier run FID uses: cfg.features, or resnet_tiny trained now on this run's training images (its
    test split is the GAN's) into RUN/image/features, and reused from there on a resume."""
    if cfg.features:
        return Path(cfg.features)
    path = run.path / FEATURES_SUBDIR
    if (path / "checkpoints" / "best.safetensors").is_file():
        log(f"features: reusing the classifier in {path}")
        return path
    if path.exists():
        shutil.rmtree(path)  # an unfinished one (training stopped while it was made): make it again
    labelled = len(data.classes) >= 2
    source = _labelled_csv(run, data) if labelled else _rotation_tree(run, data)
    what = "its classes" if labelled else "a stand-in task (which way each image was rotated: the data has no classes)"
    log(f"features: training {FEATURE_MODEL} on {what} for {cfg.features_epochs} epochs into {path}, for FID "
        "(nnforge features); pass --features RUN to use a classifier you have")
    from nnforge.tasks.base import train_run

    # batches of up to 256, but at least ~8 steps an epoch on a small data set
    batch = min(256, max(16, len(data.split_samples("train")) // 8))
    icfg = ImageTrainConfig(data=str(source), model=FEATURE_MODEL, img_size=cfg.image_size, epochs=cfg.features_epochs,
                            batch_size=batch, seed=cfg.seed, device=cfg.device, precision=cfg.precision,
                            out=str(run.path), name="features", workers=cfg.workers, cache_dir=cfg.cache_dir,
                            cache_max_gb=cfg.cache_max_gb, val_split=0.1, test_split=0.0 if labelled else 0.1,
                            min_size=cfg.min_size, flip=cfg.flip and labelled)
    train_run("image", icfg)
    return path


def _labelled_csv(run: Run, data) -> Path:
    """A CSV of the GAN's images with their labels and splits (the classifier carves its val from train when the
    GAN has none), in the data's own order: the same files in the same order reuse the decoded tensor cache."""
    p = run.path / "image" / "features_split.csv"
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([s.path, s.label, s.split] for s in data.samples)
    return p


def _rotation_tree(run: Run, data) -> Path:
    """Class folders rot000 .. rot270 of training images turned by that angle, written as PNG files."""
    from PIL import Image

    root = run.path / "image" / "features_rotations"
    images = split_u8(data, "train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:ROTATION_SOURCES]
    for k in range(4):
        folder = root / f"rot{90 * k:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(pick.tolist()):
            arr = torch.rot90(images[i], k, dims=(1, 2)).permute(1, 2, 0).numpy()
            Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(folder / f"{j:05d}.png")
    return root


# ----------------------------------------------------------------------------------------------------------------
# distances between sets of features


class _Given(nn.Module):
    """torchmetrics' FID and KID take a feature extractor; ours are computed once and handed over as they are."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (torchmetrics' FID)."""
    require_torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return max(0.0, float(m.compute()))  # a set against itself can come out at -1e-9


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """Kernel inception distance (torchmetrics): (mean, std) over random subsets, seeded so it repeats."""
    require_torchmetrics()
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size == len(real) == len(fake):
        subsets = 1  # every subset would be the whole of both sets: the same number each time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features": ours are small
        m = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mean, std = m.compute()
    return float(mean), float(std)


def nearest(query: torch.Tensor, bank: torch.Tensor, k: int = 1, skip_self: bool = False,
            chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices) of the k nearest rows of `bank` for every row of `query` (L2), in chunks.
    skip_self: query is bank, and each row's own zero distance is not counted."""
    dists, idxs = [], []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk].float(), bank.float())
        if skip_self:
            d[torch.arange(len(d)), torch.arange(i, i + len(d))] = float("inf")
        v, j = d.topk(k, dim=1, largest=False)
        dists.append(v)
        idxs.append(j)
    return torch.cat(dists), torch.cat(idxs)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the union of balls
    around its points reaching their k-th nearest neighbour. Precision: the share of fake points inside the real
    manifold (how realistic); recall: the share of real points inside the fake manifold (how much it covers)."""
    def inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
        hit = [(torch.cdist(points[i:i + chunk].float(), centres.float()) <= radii[None]).any(1)
               for i in range(0, len(points), chunk)]
        return float(torch.cat(hit).float().mean())

    r_real = nearest(real, real, k, skip_self=True)[0][:, -1]
    r_fake = nearest(fake, fake, k, skip_self=True)[0][:, -1]
    return inside(fake, real, r_real), inside(real, fake, r_fake)


def diversity(features: torch.Tensor, limit: int = 2000) -> float:
    """Mean pairwise L2 distance within a set (the first `limit` rows): how spread out the samples are."""
    f = features[:limit].float()
    n = len(f)
    if n < 2:
        return 0.0
    return float(torch.cdist(f, f).sum() / (n * (n - 1)))


def class_shares(logits: torch.Tensor, num_classes: int) -> np.ndarray:
    """Share of images the classifier puts in each class."""
    return np.bincount(logits.argmax(1).numpy(), minlength=num_classes) / max(1, len(logits))
