"""Classification (images now, text as another input kind): train a run, evaluate it, predict with it.

    run = train_classifier(ImageTrainConfig(data="data/fashion-mnist", epochs=3))
    evaluate_run(run.path)
    Predictor(run.path).predict(["shoe.png"], top_k=3)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from nnforge.config import EngineConfig, ImageTrainConfig, save_config
from nnforge.data.cache import TensorCache
from nnforge.data.images import ImageData, class_weights_for, find_samples
from nnforge.data.preprocess import InputError, build_preprocessor
from nnforge.engine.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file
from nnforge.engine.device import autocast, resolve_device, resolve_precision
from nnforge.engine.loop import fit
from nnforge.engine.run import Run, git_commit, versions
from nnforge.engine.seeding import seed_everything
from nnforge.evaluation.metrics import write_evaluation
from nnforge.evaluation.report import write_report
from nnforge.models import create_model, get_entry


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_data(cfg: EngineConfig):
    cache = TensorCache(getattr(cfg, "cache_dir", None), int(getattr(cfg, "cache_max_gb", 4.0) * 2**30))
    if isinstance(cfg, ImageTrainConfig):
        return ImageData.load(cfg, cache, log=_log)
    from nnforge.data.text import TextData  # the text family is optional until its packages are installed

    return TextData.load(cfg, log=_log)


def load_weights(model: nn.Module, source: str, model_name: str) -> None:
    """Start from a local state dict or an nnforge run/checkpoint; the head is left as built (new classes)."""
    p = Path(source)
    if p.is_dir():
        p = p / "checkpoints" / "best.safetensors" if (p / "checkpoints").is_dir() else p
    if p.suffix == ".safetensors" and p.is_file():
        try:
            tensors, _ = load_checkpoint(p)
            sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        except CheckpointError:
            sd = load_state_dict_file(p)
    else:
        sd = load_state_dict_file(p)
    head = get_entry(model_name).head + "."
    own = model.state_dict()
    for k, v in sd.items():  # an RGB stem into a grayscale model: sum the kernels over the colour channels
        if k in own and v.dim() == 4 and own[k].shape[1] == 1 and v.shape[1] == 3 and own[k].shape[0] == v.shape[0]:
            sd[k] = v.sum(1, keepdim=True)
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and not k.startswith(head)}
    if not usable:
        raise CheckpointError(f"{source}: no tensor matches {model_name} by name and shape; wrong architecture?")
    model.load_state_dict(usable, strict=False)
    skipped = len(sd) - len(usable)
    _log(f"weights: loaded {len(usable)}/{len(own)} tensors from {source}"
         f"{f' ({skipped} skipped: head or shape mismatch)' if skipped else ''}")


def model_kwargs(cfg, data) -> dict:
    """The model's constructor arguments: what the data fixes (channels, size, vocabulary), then model_args."""
    fixed = data.model_kwargs()
    clash = sorted(set(cfg.model_args) & set(fixed))
    if clash:
        raise ValueError(f"model_args: {', '.join(clash)} follow from the data and config; set them there instead")
    return {**fixed, **cfg.model_args}


def _meta(cfg, data, run: Run, model: nn.Module, kwargs: dict) -> dict:
    return {
        "task": data.kind, "kind": data.kind, "model": cfg.model, "model_kwargs": kwargs,
        "classes": data.classes, "num_classes": len(data.classes), "spec": data.spec, "seed": cfg.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data_fingerprint": data.report.get("fingerprint"), "git_commit": git_commit(Path(__file__).parent),
        "versions": versions(), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "run": str(run.path),
    }


@torch.no_grad()
def _val_metrics(model: nn.Module, data, device, amp) -> dict[str, float]:
    model.eval()
    loss, correct, n = 0.0, 0, 0
    split = "val" if data.labels("val").numel() else "train"
    for x, y in data.eval_batches(split, device):
        with autocast(device, amp):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train()
    return {"val_loss": loss / max(1, n), "val_acc": correct / max(1, n)}


def train_classifier(cfg: EngineConfig, resume: str | None = None) -> Run:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    task = "image" if isinstance(cfg, ImageTrainConfig) else "text"
    run = Run(resume) if resume else Run.create(cfg.out, task, cfg.name)
    _log(f"run: {run.path}")
    data = load_data(cfg)
    if hasattr(data, "save_artifacts"):
        data.save_artifacts(run.path)  # e.g. the text tokenizer, reloaded with the run
    kwargs = model_kwargs(cfg, data)  # once: a pretrained encoder's config is read from disk to build it
    model = create_model(cfg.model, len(data.classes), **kwargs,
                         **({"pretrained": True} if getattr(cfg, "pretrained", False) else {}))
    if getattr(cfg, "weights", None) and not resume:
        load_weights(model, cfg.weights, cfg.model)
    meta = _meta(cfg, data, run, model, kwargs)
    save_config(cfg, run.path / "config.yaml")
    run.write_json("meta.json", meta)
    run.write_json("data_report.json", data.report)
    run.write_json("split.json", data.split_record())
    weights = class_weights_for(data.labels("train"), len(data.classes)) if cfg.class_weights == "auto" else None
    amp = resolve_precision(cfg.precision, device)
    ckpt_meta = {k: meta[k] for k in ("task", "kind", "model", "model_kwargs", "classes", "num_classes", "spec")}
    ckpt_meta["ema"] = bool(cfg.ema)
    resume_ckpt = str(run.checkpoint("last")) if resume else None
    state = fit(model, data.train_source(device), lambda m: _val_metrics(m, data, device, amp), cfg, run,
                device=device, ckpt_meta=ckpt_meta, class_weights=weights,
                head_names=[get_entry(cfg.model).head + "."], resume_from=resume_ckpt)
    _log(f"best {cfg.monitor} {state.best:.4f} at epoch {state.best_epoch}; checkpoints in {run.checkpoints}")
    if data.labels("test").numel():
        evaluate_run(run.path, device=cfg.device)
    else:
        _log(f"report: {write_report(run.path)} (no test split: evaluate with --data to add test metrics)")
    return run


# ----------------------------------------------------------------------------------------------------------------
# loading a run for inference


class Predictor:
    """A trained run, ready to predict. Loads tensors and JSON only; never unpickles anything."""

    def __init__(self, run: str | Path, which: str = "best", device: str = "auto"):
        self.run = Run(run)
        ckpt = self.run.checkpoint(which)
        tensors, meta = load_checkpoint(ckpt)
        self.meta, self.classes, self.spec = meta, meta["classes"], meta["spec"]
        self.device = resolve_device(device)
        self.model = create_model(meta["model"], meta["num_classes"], **meta["model_kwargs"])
        prefix = "ema." if meta.get("ema") else "model."
        self.model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.model.to(self.device).eval()
        self.preprocessor = build_preprocessor(self.spec, self.run.path)
        # Image convolutions run ~2x faster channels-last on CPUs (oneDNN) and GPUs; still fp32, like the export.
        self.channels_last = self.spec["kind"] == "image" and self.device.type != "mps"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def load_input(self, item) -> np.ndarray:
        """One input (a file path or bytes for images; a string or bytes for text) -> the model's input array."""
        pre = self.preprocessor
        if isinstance(item, bytes):
            return pre.decode(item)
        return pre.load(item) if pre.kind == "image" else pre.decode(item)

    @torch.no_grad()
    def logits(self, arrays: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(arrays).to(self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()

    def chunks(self, inputs: list, batch_size: int = 512):
        """Per chunk: (indices of the usable inputs, their (n, K) probabilities, [(index, reason)] of the others).

        Each input is decoded once, and only one chunk is held in memory at a time.
        """
        for start in range(0, len(inputs), batch_size):
            good, arrays, bad = [], [], []
            for i in range(start, min(start + batch_size, len(inputs))):
                try:
                    arrays.append(self.load_input(inputs[i]))
                    good.append(i)
                except InputError as err:
                    bad.append((i, str(err)))
            probs = np.zeros((0, len(self.classes)), np.float32)
            if arrays:
                probs = torch.softmax(torch.from_numpy(self.logits(self.preprocessor.batch(arrays))), 1).numpy()
            yield good, probs, bad

    def predict_proba(self, inputs: list, batch_size: int = 256) -> np.ndarray:
        """(N, K) class probabilities; raises InputError naming the first bad input."""
        out = []
        for _, probs, bad in self.chunks(inputs, batch_size):
            if bad:
                raise InputError(bad[0][1])
            out.append(probs)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def rows(self, inputs: list, probs: np.ndarray, top_k: int = 3) -> list[dict]:
        k = min(top_k, len(self.classes))
        rows = []
        for item, p in zip(inputs, probs, strict=True):
            top = np.argsort(-p)[:k]
            rows.append({"input": item if isinstance(item, str) else "<bytes>",
                         "labels": [self.classes[j] for j in top], "probs": [float(p[j]) for j in top]})
        return rows

    def predict(self, inputs: list, top_k: int = 3) -> list[dict]:
        return self.rows(inputs, self.predict_proba(inputs), top_k)


def expand_inputs(inputs: list[str], kind: str) -> list[str]:
    """Files and folders (searched recursively for images) for images; strings or @file-of-lines for text."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if kind == "image":
            if p.is_dir():
                out += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
            else:
                out.append(item)
        elif item.startswith("@"):
            out += [line.rstrip("\n") for line in Path(item[1:]).read_text(encoding="utf-8").splitlines() if line]
        else:
            out.append(item)
    return out


def predict_safely(pred: Predictor, inputs: list, top_k: int = 3) -> tuple[list[dict], list[dict]]:
    """Predict what can be predicted; bad inputs are returned with their reason instead of stopping the batch."""
    rows, bad = [], []
    for good, probs, failed in pred.chunks(inputs):
        rows += pred.rows([inputs[i] for i in good], probs, top_k)
        bad += [{"input": inputs[i], "error": reason} for i, reason in failed]
    return rows, bad


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _test_items(run: Run, data: str | None, kind: str, classes: list[str]) -> tuple[list, list[int]]:
    """(items, labels): the run's own test split, or every labelled example under --data."""
    index = {c: i for i, c in enumerate(classes)}
    if data is None:
        pairs = run.read_json("split.json")["test"]
    elif kind == "image":
        pairs = [[s.path, s.label] for s in find_samples(data)]
    else:
        from nnforge.data.text import read_labelled_texts

        cfg = yaml.safe_load((run.path / "config.yaml").read_text())
        pairs = read_labelled_texts(data, cfg)
    unknown = sorted({y for _, y in pairs if y not in index})
    if unknown:
        raise ValueError(f"{data}: labels {unknown} are not among the run's classes {classes}")
    return [p for p, _ in pairs], [index[y] for _, y in pairs]


def evaluate_run(run_path: str | Path, data: str | None = None, device: str = "auto", split_name: str = "test"):
    run = Run(run_path)
    pred = Predictor(run.path, device=device)
    items, labels = _test_items(run, data, pred.spec["kind"], pred.classes)
    if not items:
        raise ValueError(f"{run.path}: no test examples to evaluate (pass --data)")
    keep, skipped, probs = [], [], []
    for good, p, failed in pred.chunks(items):
        keep += [(items[i], labels[i]) for i in good]
        skipped += [{"path": str(items[i]), "reason": reason} for i, reason in failed]
        probs.append(p)
    if not keep:
        raise ValueError(f"none of the {len(items)} examples could be read (first: {skipped[0]['path']}: "
                         f"{skipped[0]['reason']})")
    probs = np.concatenate(probs)
    y_true = np.array([y for _, y in keep])
    report = write_evaluation(run.eval_dir, y_true, probs, pred.classes, [str(i) for i, _ in keep],
                              pred.spec["kind"], split=split_name)
    if skipped:
        run.write_json("eval/skipped.json", skipped)
    acc = report["accuracy"]
    _log(f"evaluate: {len(keep)} examples, accuracy {acc:.4f}"
         + "".join(f", top-{k} {v:.4f}" for k, v in report.get("top_k_accuracy", {}).items())
         + (f" ({len(skipped)} unreadable skipped)" if skipped else "") + f"; details in {run.eval_dir}")
    _log(f"report: {write_report(run.path)}")
    return report
