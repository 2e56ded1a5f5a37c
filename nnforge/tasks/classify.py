"""The classification task: images or texts in, class probabilities out.

    run = nnforge.train("image", data="data/fashion-mnist", epochs=3)     # the input type is the data's
    TASK.evaluate(run)                                                   # eval/ and report.html

The input type (image, text) is a property of the data: each has its config (ImageTrainConfig, TextTrainConfig)
and its data class (ImageData, TextData), listed once in INPUTS; everything else here is the same for both.
The step is cross-entropy with label smoothing and optional class weights; validation reports val_loss and
val_acc; the run records a "probs" output over the class names, so predict, export and serve need nothing else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from nnforge.config import ClassifyConfig, ImageTrainConfig, TextTrainConfig
from nnforge.data.cache import TensorCache
from nnforge.data.rules import class_weights_for
from nnforge.engine.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file
from nnforge.engine.device import autocast, resolve_precision
from nnforge.engine.loop import StepContext, Trainable
from nnforge.engine.optim import OptimSpec
from nnforge.engine.run import Run
from nnforge.evaluation.metrics import write_evaluation
from nnforge.evaluation.report import write_report
from nnforge.inference import Loaded, model_record
from nnforge.models import create_model, get_entry
from nnforge.tasks.base import Built


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the input types


def _image_data(cfg: ImageTrainConfig):
    from nnforge.data.images import ImageData

    return ImageData.load(cfg, TensorCache(cfg.cache_dir, int(cfg.cache_max_gb * 2**30)), log=_log)


def _text_data(cfg: TextTrainConfig):
    from nnforge.data.text import TextData  # the text family is optional until its packages are installed

    return TextData.load(cfg, log=_log)


def _image_pairs(data: str, cfg: dict) -> list[list[str]]:
    from nnforge.data.images import find_samples

    return [[s.path, s.label] for s in find_samples(data, cfg.get("path_col", "path"), cfg.get("label_col", "label"))]


def _text_pairs(data: str, cfg: dict) -> list[list[str]]:
    from nnforge.data.text import read_labelled_texts

    return read_labelled_texts(data, cfg)


@dataclass(frozen=True)
class InputType:
    config: type[ClassifyConfig]
    load: Any  # cfg -> the data set (ImageData / TextData)
    labelled: Any  # (path, run config) -> [[item, label], ...] for `evaluate --data`


INPUTS = {"image": InputType(ImageTrainConfig, _image_data, _image_pairs),
          "text": InputType(TextTrainConfig, _text_data, _text_pairs)}


def input_of(cfg: ClassifyConfig) -> str:
    return next(name for name, t in INPUTS.items() if isinstance(cfg, t.config))


def load_data(cfg: ClassifyConfig):
    return INPUTS[input_of(cfg)].load(cfg)


# ----------------------------------------------------------------------------------------------------------------
# the model


def load_weights(model: nn.Module, source: str, model_name: str) -> None:
    """Start from a local state dict or an nnforge run/checkpoint; the head is left as built (new classes)."""
    p = Path(source)
    if p.is_dir():
        p = p / "checkpoints" / "best.safetensors" if (p / "checkpoints").is_dir() else p
    if p.suffix == ".safetensors" and p.is_file():
        try:
            tensors, meta = load_checkpoint(p)
            prefix = model_record(meta)["module"] + "."  # the weights the run evaluated and served (EMA if kept)
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
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


def weights_normalisation(source: str) -> dict | None:
    """The input normalisation of the nnforge run that --weights points into, or None for a plain state dict."""
    p = Path(source)
    for folder in (p, p.parent, p.parent.parent):
        ckpt = folder / "checkpoints" / "best.safetensors"
        if ckpt.is_file():
            try:
                spec = model_record(load_checkpoint(ckpt)[1])["io"]["input"]
            except (CheckpointError, KeyError):
                return None
            return {"name": f"from {folder}", "mean": spec["mean"], "std": spec["std"]} if "mean" in spec else None
    return None


def model_kwargs(cfg: ClassifyConfig, data) -> dict:
    """The model's constructor arguments: what the data fixes (classes, channels, vocabulary), then model_args."""
    fixed = {"num_classes": len(data.classes), **data.model_kwargs()}
    clash = sorted(set(cfg.model_args) & set(fixed))
    if clash:
        raise ValueError(f"model_args: {', '.join(clash)} follow from the data and config; set them there instead")
    return {**fixed, **cfg.model_args}


def build_model(cfg: ClassifyConfig, data, resuming: bool = False) -> tuple[nn.Module, dict]:
    """(model, its constructor arguments as recorded in the run); pretrained or --weights applied."""
    entry = get_entry(cfg.model)
    if entry.task != "classify" or entry.input != data.kind:
        raise ValueError(f"model '{cfg.model}' is a {entry.input or entry.task} model, not an {data.kind} "
                         f"classifier; see nnforge list-models --input {data.kind}")
    kwargs = model_kwargs(cfg, data)  # once: a pretrained encoder's config is read from disk to build it
    model = create_model(cfg.model, **kwargs, **({"pretrained": True} if cfg.pretrained else {}))
    if cfg.weights and not resuming:
        load_weights(model, cfg.weights, cfg.model)
    return model, kwargs


def match_normalisation(cfg: ClassifyConfig, data) -> None:
    """Published weights expect inputs normalised as they were trained (ImageNet mean/std, or [-1, 1]): use that
    instead of the data's own statistics, and record it in the run so predict, export and serve do the same."""
    if not hasattr(data, "set_normalisation"):
        return
    entry = get_entry(cfg.model)
    norm = entry.pretrained_norm if cfg.pretrained else None
    if norm is None and cfg.weights:
        norm = weights_normalisation(cfg.weights)
    if norm is not None:
        data.set_normalisation(norm["mean"], norm["std"], norm["name"])
        _log(f"inputs normalised as the weights expect ({norm['name']}), not with the data's own statistics")


# ----------------------------------------------------------------------------------------------------------------
# training


def classification_step(models: dict[str, nn.Module], batch, ctx: StepContext, weight: torch.Tensor | None,
          label_smoothing: float) -> tuple[int, dict[str, torch.Tensor]]:
    x, y = batch
    with ctx.autocast():
        logits = models["model"](x)
    loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=label_smoothing)
    ctx.update(loss)
    return len(y), {"loss": loss.detach(), "acc": (logits.detach().argmax(1) == y).float().mean()}


@torch.no_grad()
def _validate(models: dict[str, nn.Module], data, device, amp) -> dict[str, float]:
    model = models.get("ema", models["model"])
    loss, correct, n = 0.0, 0, 0
    split = "val" if data.labels("val").numel() else "train"
    for x, y in data.eval_batches(split, device):
        with autocast(device, amp):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return {"val_loss": loss / max(1, n), "val_acc": correct / max(1, n)}


class ClassifyTask:
    name = "classify"
    configs = {name: t.config for name, t in INPUTS.items()}

    def build(self, cfg: ClassifyConfig, run: Run, device: torch.device) -> Built:
        resuming = run.checkpoint("last").is_file()
        data = load_data(cfg)
        if hasattr(data, "save_artifacts"):
            data.save_artifacts(run.path)  # e.g. the text tokenizer, reloaded with the run
        match_normalisation(cfg, data)
        model, kwargs = build_model(cfg, data, resuming)
        run.write_json("data_report.json", data.report)
        run.write_json("split.json", data.split_record())
        weight = None
        if cfg.class_weights == "auto":
            weight = class_weights_for(data.labels("train"), len(data.classes)).to(device)
        amp = resolve_precision(cfg.precision, device)
        head = get_entry(cfg.model).head + "."

        def before_epoch(epoch: int, modules: dict[str, nn.Module]) -> None:
            frozen = epoch < cfg.freeze_epochs  # fine-tuning: the new head learns first, then the whole net
            for name, p in modules["model"].named_parameters():
                p.requires_grad_(not frozen or name.startswith(head))

        record = {"model": cfg.model, "model_kwargs": kwargs, "module": "ema" if cfg.ema else "model",
                  "io": {"verb": "predict", "input": data.spec,
                         "output": {"kind": "probs", "classes": data.classes}}}
        trainable = Trainable(
            modules={"model": model}, optimizers={"model": OptimSpec.from_config(cfg)},
            step=lambda models, batch, ctx: classification_step(models, batch, ctx, weight, cfg.label_smoothing),
            source=data.train_source(device), validate=lambda models: _validate(models, data, device, amp),
            directions={"val_acc": "max", "val_loss": "min"}, ema={"ema": "model"}, before_epoch=before_epoch,
            meta=record)
        meta = {"input": data.kind, "classes": data.classes, "num_classes": len(data.classes),
                "data_fingerprint": data.report.get("fingerprint")}
        return Built(trainable, meta, evaluate_after=bool(data.labels("test").numel()))

    def evaluate(self, run: Run | str | Path, data: str | None = None, device: str = "auto",
                 split_name: str = "test") -> dict:
        return evaluate_run(run.path if isinstance(run, Run) else run, data, device, split_name)


TASK = ClassifyTask()


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _test_items(run: Run, data: str | None, input_name: str, classes: list[str]) -> tuple[list, list[int]]:
    """(items, labels): the run's own test split, or every labelled example under --data."""
    index = {c: i for i, c in enumerate(classes)}
    if data is None:
        pairs = run.read_json("split.json")["test"]
    else:
        pairs = INPUTS[input_name].labelled(data, yaml.safe_load((run.path / "config.yaml").read_text()) or {})
    unknown = sorted({y for _, y in pairs if y not in index})
    if unknown:
        raise ValueError(f"{data}: labels {unknown} are not among the run's classes {classes}")
    return [p for p, _ in pairs], [index[y] for _, y in pairs]


def evaluate_run(run_path: str | Path, data: str | None = None, device: str = "auto", split_name: str = "test"):
    run = Run(run_path)
    loaded = Loaded(run.path, device=device)
    items, labels = _test_items(run, data, loaded.input.name, loaded.classes)
    if not items:
        raise ValueError(f"{run.path}: no test examples to evaluate (pass --data)")
    keep, skipped, probs = [], [], []
    for good, raw, failed in loaded.chunks(items):
        keep += [(items[i], labels[i]) for i in good]
        skipped += [{"path": str(items[i]), "reason": reason} for i, reason in failed]
        if raw is not None:
            probs.append(loaded.output.finish(raw))
    if not keep:
        raise ValueError(f"none of the {len(items)} examples could be read (first: {skipped[0]['path']}: "
                         f"{skipped[0]['reason']})")
    y_true = np.array([y for _, y in keep])
    report = write_evaluation(run.eval_dir, y_true, np.concatenate(probs), loaded.classes,
                              [str(i) for i, _ in keep], loaded.input.name, split=split_name)
    if skipped:
        run.write_json("eval/skipped.json", skipped)
    acc = report["accuracy"]
    _log(f"evaluate: {len(keep)} examples, accuracy {acc:.4f}"
         + "".join(f", top-{k} {v:.4f}" for k, v in report.get("top_k_accuracy", {}).items())
         + (f" ({len(skipped)} unreadable skipped)" if skipped else "") + f"; details in {run.eval_dir}")
    _log(f"report: {write_report(run.path)}")
    return report
