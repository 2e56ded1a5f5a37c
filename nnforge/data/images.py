"""Image classification data: find the files, check every one, split, cache, and serve batches.

    data = ImageData.load(cfg, cache_root)       # prints what it found and which data path it chose
    source = data.train_source(device)          # yields augmented, normalised (x, y) batches on the device

Layouts: (a) one sub-folder per class, (b) train/ val/ test/ folders each laid out like (a), (c) a CSV with a path
column and a label column (paths relative to the CSV). Small images are decoded once into a uint8 tensor cache on
disk, keyed by a fingerprint of the files, and augmented as whole batches on the device; large images stream through
DataLoader workers with torchvision transforms.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnforge.config import ImageTrainConfig
from nnforge.data.cache import TensorCache, fingerprint_files
from nnforge.data.imageio import ImageCheck, check_image, read_image, to_8bit
from nnforge.data.rules import (
    DataError,
    assign_splits,
    check_classes,
    epoch_order,
    find_duplicates,
    log_problems,
    normalise_labels,
    split_counts,
    split_name,
)
from nnforge.data.tables import read_table
from nnforge.engine.progress import Progress
from nnforge.engine.seeding import derived_generator

__all__ = ["DataError", "ImageData", "Sample", "find_samples"]
TENSOR_CACHE_MAX_SIDE = 96  # above this, decoded images are too big to keep in memory: stream them


@dataclass
class Sample:
    path: str  # absolute
    label: str
    split: str  # train | val | test, from the layout (the split for "train" may still carve val/test from it)


# --------------------------------------------------------------------------------------------------------------
# finding files


def _class_folder_samples(root: Path, split: str, notes: dict) -> list[Sample]:
    classes = sorted(p for p in root.iterdir() if not p.name.startswith(".") and _is_dir(p))
    if not classes:
        raise DataError(f"{root}: no class sub-folders; expected one folder per class holding its images")
    out = []
    for c in classes:
        files = _files_under(c, notes)
        if not files:
            raise DataError(f"{c}: class folder '{c.name}' is empty")
        out += [Sample(f, c.name, split) for f in files]
    return out


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:  # a link to itself (ELOOP): not a folder to list; _files_under reports it
        return False


def _files_under(folder: Path, notes: dict) -> list[str]:
    """Sorted absolute paths of the non-hidden files below `folder`, hidden folders skipped.

    os.scandir reads each entry's type from the directory itself: listing 70,000 files takes well under a second,
    where rglob + resolve() per file took several. Symbolic links are followed, but a folder is listed once (a link
    back up the tree would loop forever), and links that are broken or loop on themselves are counted in
    notes["bad_links"]; links leading out of the data folder in notes["outside_links"].
    """
    root = os.path.realpath(notes.get("root", folder))
    out, stack, seen = [], [str(folder.resolve())], set()
    while stack:
        here = stack.pop()
        real = os.path.realpath(here)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(here) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    is_dir, is_file = e.is_dir(), e.is_file()
                except OSError as err:  # ELOOP: a link that leads back to itself
                    notes.setdefault("bad_links", []).append({"path": e.path, "reason": f"symbolic link loop "
                                                              f"({err.strerror})"})
                    continue
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    inside = os.path.commonpath([root, target]) == root
                    if not (is_dir or is_file):
                        notes.setdefault("bad_links", []).append(
                            {"path": e.path, "reason": f"broken symbolic link (its target {target} is missing)"})
                        continue
                    if is_dir and inside:  # a folder link back into the data: it would list images twice, or loop
                        notes.setdefault("bad_links", []).append(
                            {"path": e.path, "reason": f"symbolic link loop (to {target}, inside the data folder)"})
                        continue
                    if not inside:
                        notes.setdefault("outside_links", []).append({"path": e.path, "target": target})
                if is_dir:
                    stack.append(e.path)
                elif is_file:
                    out.append(e.path)
    return sorted(out)


def _csv_samples(csv_path: Path, path_col: str, label_col: str) -> list[Sample]:
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    table = read_table(csv_path, delimiter, {path_col: "--path-col", label_col: "--label-col"}, label=label_col)
    if table.skipped:  # a list of files is short and hand-made: a broken line is an error, not a skipped image
        first = table.skipped[0]
        raise DataError(f"{first['path']}: {first['reason']}")
    pi, li = table.columns[path_col], table.columns[label_col]
    split_i = table.header.index("split") if "split" in table.header else None
    out = []
    for line, rec in table.rows:
        p, y = rec[pi].strip(), rec[li].strip()
        if not p or not y:
            raise DataError(f"{csv_path}:{line}: empty '{path_col}' or '{label_col}'")
        split = split_name(rec[split_i] or "train") if split_i is not None else "train"
        out.append(Sample(str((csv_path.parent / p).resolve()), y, split or "train"))
    return out


def find_samples(data: str | Path, path_col: str = "path", label_col: str = "label",
                 notes: dict | None = None, flat: bool = False) -> list[Sample]:
    """Every image of the layout with its label and split; labels normalised (rules.normalise_label), the
    spellings that changed counted in notes["labels_normalised"] when a dict is given.

    flat: a folder of images with no sub-folders is also a layout, one class named after the folder (for tasks
    whose labels are optional: a GAN)."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() not in (".csv", ".tsv"):
            raise DataError(f"{root}: expected a folder of class folders or a CSV of paths and labels")
        samples = _csv_samples(root, path_col, label_col)
    else:
        notes = {} if notes is None else notes
        notes["root"] = str(root)
        split_dirs = {split_name(p.name): p for p in root.iterdir() if split_name(p.name) and _is_dir(p)}
        if "train" in split_dirs:  # layout (b)
            samples = [s for split, p in split_dirs.items() for s in _class_folder_samples(p, split, notes)]
        elif flat and not any(_is_dir(p) for p in root.iterdir() if not p.name.startswith(".")):
            samples = [Sample(f, root.resolve().name, "train") for f in _files_under(root, notes)]
        else:
            samples = _class_folder_samples(root, "train", notes)
        notes.pop("root")
    if not samples:
        raise DataError(f"{root}: no images found")
    labels, changed = normalise_labels([s.label for s in samples])
    for s, y in zip(samples, labels, strict=True):
        s.label = y
    if notes is not None:
        notes["labels_normalised"] = changed
    return samples


# --------------------------------------------------------------------------------------------------------------
# checking and splitting


def _parallel_map(fn, jobs: list, workers: int, desc: str) -> list:
    """fn over jobs in worker processes (in order), with progress; small jobs run inline."""
    bar = Progress(len(jobs), desc, "files", every_s=10.0)
    out = []
    if workers <= 1 or len(jobs) < 256:
        for j in jobs:
            out.append(fn(j))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as ex:
            for r in ex.map(fn, jobs, chunksize=256):
                out.append(r)
                bar.update()
    bar.close()
    return out


def _check_one(job: tuple[str, int]) -> ImageCheck:
    return check_image(*job)


def check_all(paths: list[str], min_size: int, workers: int) -> list[ImageCheck]:
    return _parallel_map(_check_one, [(p, min_size) for p in paths], workers, "checking")


# --------------------------------------------------------------------------------------------------------------
# batches


def normalise(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_u8.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Batch augmentation on the device: pad by `pad` (zeros) and crop back at a random offset; random h-flip."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        mask = (torch.rand(b, generator=g) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class TensorBatches:
    """Training batches from a uint8 tensor already in memory (on the training device)."""

    def __init__(self, images, labels, batch_size, seed, mean, std, pad, flip, sampler):
        self.images, self.labels, self.bs, self.seed = images, labels, batch_size, seed
        self.mean, self.std, self.pad, self.flip, self.sampler = mean, std, pad, flip, sampler

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.bs)  # drop the ragged last batch: BatchNorm dislikes tiny ones

    def epoch(self, epoch: int, start: int = 0):
        order = epoch_order(self.labels, self.sampler, derived_generator(self.seed, epoch)).to(self.labels.device)
        for b in range(start, len(self)):
            idx = order[b * self.bs:(b + 1) * self.bs]
            g = derived_generator(self.seed, epoch, b)
            x = random_crop_flip(self.images[idx], self.pad, self.flip, g)
            yield normalise(x, self.mean, self.std), self.labels[idx]


class _FileDataset(torch.utils.data.Dataset):
    """Streams training images; augmentation is seeded per (seed, epoch, index) so resumes repeat exactly."""

    def __init__(self, paths, labels, channels, size, seed):
        from torchvision.transforms import v2

        self.paths, self.labels, self.channels, self.seed, self.epoch = paths, labels, channels, seed, 0
        self.augment = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                                   v2.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        torch.manual_seed(int(derived_generator(self.seed, self.epoch, i).initial_seed()))
        with Image.open(self.paths[i]) as img:
            return self.augment(to_8bit(img).convert("L" if self.channels == 1 else "RGB")), self.labels[i]


class StreamBatches:
    def __init__(self, dataset: _FileDataset, batch_size, seed, mean, std, device, workers, sampler):
        self.ds, self.bs, self.seed, self.mean, self.std = dataset, batch_size, seed, mean, std
        self.device, self.workers, self.sampler = device, workers, sampler
        self.labels = torch.tensor(dataset.labels)

    def __len__(self):
        return max(1, len(self.ds) // self.bs)

    def epoch(self, epoch: int, start: int = 0):
        self.ds.epoch = epoch
        order = epoch_order(self.labels, self.sampler, derived_generator(self.seed, epoch))
        batches = [order[b * self.bs:(b + 1) * self.bs].tolist() for b in range(start, len(self))]
        loader = torch.utils.data.DataLoader(self.ds, batch_sampler=batches, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield normalise(x.to(self.device, non_blocking=True), self.mean, self.std), y.to(self.device)


# --------------------------------------------------------------------------------------------------------------
# the data set


class ImageData:
    kind = "image"

    def __init__(self, samples, classes, channels, size, mean, std, cfg, report, tensors=None, row_of=None):
        self.samples, self.classes, self.channels, self.size = samples, classes, channels, size
        self.mean, self.std, self.cfg, self.report = mean, std, cfg, report
        self.tensors, self.row_of = tensors, row_of  # uint8 (N, C, S, S) cache and sample index -> row
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.norm = "data"  # the training split's own per-channel mean and std

    # ---- construction ----
    @classmethod
    def load(cls, cfg: ImageTrainConfig, cache: TensorCache, log=print, min_classes: int = 2) -> ImageData:
        """min_classes=1: labels are optional (a flat folder of images is one class), as for a GAN."""
        workers = cfg.workers or os.cpu_count() or 1
        notes: dict = {}
        samples = find_samples(cfg.data, cfg.path_col, cfg.label_col, notes, flat=min_classes < 2)
        paths = [s.path for s in samples]
        fp = fingerprint_files(paths, extra=f"min_size={cfg.min_size}")
        checks = cache.get_json(f"checks-{fp}")
        if checks is None:
            log(f"checking {len(paths)} files with {workers} workers ...")
            checks = [asdict(c) for c in check_all(paths, cfg.min_size, workers)]
            cache.put_json(f"checks-{fp}", checks)
        checks = [ImageCheck(**c) for c in checks]
        bad_links = notes.pop("bad_links", [])  # listed, never read: counted among the files, skipped
        skipped = bad_links + [{"path": c.path, "reason": c.reason} for c in checks if not c.ok]
        good = [(s, c) for s, c in zip(samples, checks, strict=True) if c.ok]
        if not good:
            raise DataError(f"{cfg.data}: no usable images ({len(skipped)} files skipped; first: "
                            f"{skipped[0]['path']}: {skipped[0]['reason']})")
        samples, checks = [s for s, _ in good], [c for _, c in good]
        labels, where = [s.label for s in samples], [s.path for s in samples]
        classes = check_classes(labels, [s.split for s in samples], where, cfg.data, min_classes)
        keys = [c.sha256 for c in checks]
        new_splits = assign_splits(labels, [s.split for s in samples], keys, cfg.val_split, cfg.test_split, cfg.seed)
        for s, split in zip(samples, new_splits, strict=True):
            s.split = split
        dups = find_duplicates(keys, new_splits, labels, where)
        data_root = Path(cfg.data).resolve()

        channels = 1 if all(c.mode in ("L", "1", "I", "I;16", "F") for c in checks) else 3
        size = cfg.img_size or _common_side(checks)
        mode = cfg.cache if cfg.cache != "auto" else ("tensor" if size <= TENSOR_CACHE_MAX_SIDE else "stream")
        counts = split_counts(labels, new_splits)
        report = {"data": str(data_root), "fingerprint": fp, "files": len(paths) + len(bad_links),
                  "usable": len(samples),
                  "skipped": skipped, "duplicates": dups, "counts": counts, "channels": channels, "size": size,
                  "cache": mode, **notes}
        _print_report(report, log)

        tensors = row_of = None
        if mode == "tensor":
            key = f"images-{fp}-{channels}x{size}"
            tensors = cache.get_tensor(key)
            if tensors is None:
                log(f"data path: tensor cache (decoding {len(samples)} images once to {channels}x{size} uint8)")
                tensors = _decode_all([s.path for s in samples], channels, size, workers)
                cache.put_tensor(key, tensors)
            else:
                log(f"data path: tensor cache (reusing {cache.path_of(key)})")
            row_of = {s.path: i for i, s in enumerate(samples)}
        else:
            log(f"data path: streaming {size}x{size} crops through {workers} DataLoader workers")
        mean, std = _channel_stats(samples, tensors, row_of, channels, size)
        return cls(samples, classes, channels, size, mean, std, cfg, report, tensors, row_of)

    # ---- what the task needs ----
    @property
    def spec(self) -> dict:
        """Everything predict/serve need to turn a file into the model's input."""
        return {"kind": "image", "channels": self.channels, "size": self.size,
                "mean": self.mean.tolist(), "std": self.std.tolist(), "norm": self.norm}

    def set_normalisation(self, mean, std, name: str) -> None:
        """Normalise with given per-channel statistics (what pretrained weights expect) instead of the data's own;
        RGB statistics for grayscale images are averaged over the channels."""
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if len(mean) != self.channels:
            mean, std = mean.mean().repeat(self.channels), std.mean().repeat(self.channels)
        self.mean, self.std, self.norm = mean, std, name

    def blind(self, x: torch.Tensor) -> torch.Tensor:
        """One input for every example (the doctor's baseline): zeros, the mean image after normalisation."""
        return torch.zeros_like(x)

    def model_kwargs(self) -> dict:
        return {"in_chans": self.channels, "img_size": self.size}

    def split_samples(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    def items(self, split: str) -> list[str]:
        return [s.path for s in self.split_samples(split)]

    def labels(self, split: str) -> torch.Tensor:
        return torch.tensor([self.class_index[s.label] for s in self.split_samples(split)], dtype=torch.long)

    def split_record(self) -> dict:
        return {sp: [[s.path, s.label] for s in self.split_samples(sp)] for sp in ("train", "val", "test")}

    def train_source(self, device: torch.device):
        cfg = self.cfg
        mean, std = self.mean.to(device), self.std.to(device)
        labels = self.labels("train")
        if self.tensors is not None:
            rows = torch.tensor([self.row_of[s.path] for s in self.split_samples("train")])
            pad = cfg.crop_pad if cfg.crop_pad is not None else self.size // 8
            return TensorBatches(self.tensors[rows].to(device), labels.to(device), cfg.batch_size, cfg.seed,
                                 mean, std, pad, cfg.flip, cfg.sampler)
        ds = _FileDataset(self.items("train"), labels.tolist(), self.channels, self.size, cfg.seed)
        return StreamBatches(ds, cfg.batch_size, cfg.seed, mean, std, device, cfg.workers or os.cpu_count() or 1,
                             cfg.sampler)

    def eval_batches(self, split: str, device: torch.device, batch_size: int = 512):
        """(x, y) batches of a split in order, with no augmentation."""
        mean, std = self.mean.to(device), self.std.to(device)
        samples, labels = self.split_samples(split), self.labels(split)
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            if self.tensors is not None:
                x = self.tensors[torch.tensor([self.row_of[s.path] for s in chunk])]
            else:
                x = torch.from_numpy(np.stack([read_image(s.path, self.channels, self.size) for s in chunk]))
            yield normalise(x.to(device), mean, std), labels[i:i + len(chunk)].to(device)


def _common_side(checks: list[ImageCheck]) -> int:
    side = Counter(min(c.width, c.height) for c in checks).most_common(1)[0][0]
    return side if side <= TENSOR_CACHE_MAX_SIDE else 224


def _decode_one(args) -> np.ndarray:
    path, channels, size = args
    return read_image(path, channels, size)


def _decode_all(paths: list[str], channels: int, size: int, workers: int) -> torch.Tensor:
    arrays = _parallel_map(_decode_one, [(p, channels, size) for p in paths], workers, "decoding")
    return torch.from_numpy(np.stack(arrays))


def _channel_stats(samples, tensors, row_of, channels, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the training split (a sample of up to 2,000 images when streaming)."""
    train = [s for s in samples if s.split == "train"]
    if tensors is not None:
        x = tensors[torch.tensor([row_of[s.path] for s in train])]
    else:
        pick = np.random.default_rng(0).choice(len(train), min(2000, len(train)), replace=False)
        x = torch.from_numpy(np.stack([read_image(train[i].path, channels, size) for i in pick]))
    x = x.float().div_(255).transpose(0, 1).reshape(channels, -1)  # (C, N*H*W)
    return x.mean(1), x.std(1).clamp_min(1e-3)


def _print_report(r: dict, log) -> None:
    c = r["counts"]
    log(f"data: {r['usable']} usable of {r['files']} files, {len(c['train'])} classes; "
        f"train {sum(c['train'].values())} / val {sum(c['val'].values())} / test {sum(c['test'].values())}; "
        f"{r['channels']}x{r['size']}x{r['size']}")
    log_problems(r, log, "files", "images")
