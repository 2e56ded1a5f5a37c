"""The classification task: images or texts in, class probabilities out.

    run = nnforge.train("image", data="data/fashion-mnist", epochs=3)     # the input type is the data's
    TASK.evaluate(run)                                                   # eval/ and report.html

The input type (image, text) is a property of the data: each has its config (ImageTrainConfig, TextTrainConfig)
and its data class (ImageData, TextData), listed once in INPUTS; everything else here is the same for both.
The step is cross-entropy with label smoothing and optional class weights; validation reports val_loss and
val_acc; the run records a "probs" output over the class names, so predict, export and serve need nothing else.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from nnforge.config import ClassifyConfig, ImageTrainConfig, TextTrainConfig, save_config
from nnforge.data.cache import TensorCache
from nnforge.data.rules import class_weights_for
from nnforge.engine.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file
from nnforge.engine.device import autocast, resolve_precision
from nnforge.engine.loop import StepContext, Trainable
from nnforge.engine.optim import OptimSpec
from nnforge.engine.run import Run
from nnforge.evaluation.metrics import write_evaluation
from nnforge.evaluation.report import add_section, write_report
from nnforge.inference import Loaded, model_record
from nnforge.models import create_model, get_entry
from nnforge.models.registry import LearnsFromData
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
    baseline: bool = False  # evaluation also fits the linear baseline (evaluation/baseline.py) on the same split


INPUTS = {"image": InputType(ImageTrainConfig, _image_data, _image_pairs),
          "text": InputType(TextTrainConfig, _text_data, _text_pairs, baseline=True)}


def input_of(cfg: ClassifyConfig) -> str:
    return next(name for name, t in INPUTS.items() if isinstance(cfg, t.config))


def load_data(cfg: ClassifyConfig):
    return INPUTS[input_of(cfg)].load(cfg)


# ----------------------------------------------------------------------------------------------------------------
# the model


def load_weights(model: nn.Module, source: str, model_name: str, classes: list[str] | None = None) -> None:
    """Start from a local state dict or an nnforge run/checkpoint. The head is left as built (new classes), except
    from an nnforge run with the very same classes in the same order: then it is a warm start (retraining a model
    on more data) and the head is loaded too."""
    p = Path(source)
    same_classes = False
    if p.is_dir():
        p = p / "checkpoints" / "best.safetensors" if (p / "checkpoints").is_dir() else p
    if p.suffix == ".safetensors" and p.is_file():
        try:
            tensors, meta = load_checkpoint(p)
            record = model_record(meta)
            prefix = record["module"] + "."  # the weights the run evaluated and served (EMA if kept)
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            same_classes = classes is not None and list(record["io"]["output"].get("classes") or []) == list(classes)
        except CheckpointError:
            sd = load_state_dict_file(p)
    else:
        sd = load_state_dict_file(p)
    head = get_entry(model_name).head + "."
    own = model.state_dict()
    for k, v in sd.items():  # an RGB stem into a grayscale model: sum the kernels over the colour channels
        if k in own and v.dim() == 4 and own[k].shape[1] == 1 and v.shape[1] == 3 and own[k].shape[0] == v.shape[0]:
            sd[k] = v.sum(1, keepdim=True)
    usable = {k: v for k, v in sd.items()
              if k in own and own[k].shape == v.shape and (same_classes or not k.startswith(head))}
    if not usable:
        raise CheckpointError(f"{source}: no tensor matches {model_name} by name and shape; wrong architecture?")
    model.load_state_dict(usable, strict=False)
    skipped = len(sd) - len(usable)
    head_too = " (head too: same classes)" if same_classes else ""
    _log(f"weights: loaded {len(usable)}/{len(own)} tensors from {source}{head_too}"
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
        load_weights(model, cfg.weights, cfg.model, list(data.classes))
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
# defaults: the model's recipe, then the data's size

# Fields the size rule may choose where the user set none; a run gets at least MIN_STEPS optimizer steps in at most
# MAX_EPOCHS unless the model's recipe says otherwise. A batch is about 1/50 of the training set (16 to the recipe's
# or config's batch size): 900 texts get batches of 16 and 57 steps an epoch, where 256 gave 3; Fashion-MNIST's
# 54,000 images keep 256 and 10 epochs, as before.
MIN_STEPS, MAX_EPOCHS, EXAMPLES_PER_BATCH, MIN_BATCH = 1000, 40, 50, 16


def user_fields(cfg: ClassifyConfig) -> set[str]:
    """The fields the user set (file or command line), before any default is chosen for the others."""
    return set(cfg.model_fields_set)


def apply_recipe(cfg: ClassifyConfig, user: set[str] | None = None) -> list[str]:
    """The model's recipe for every field the user left unset; what was chosen, as lines to print."""
    user = user_fields(cfg) if user is None else user
    recipe = get_entry(cfg.model).recipe or {}
    chosen = {k: v for k, v in recipe.items() if k in type(cfg).model_fields and k not in user}
    for k, v in chosen.items():
        setattr(cfg, k, v)
    notes = [f"{cfg.model}'s recipe: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in chosen.items())] if chosen else []
    lr_max = recipe.get("lr_max")
    if lr_max is not None and cfg.lr > lr_max and not getattr(cfg, "freeze_encoder", False):
        notes.append(f"WARNING: --lr {cfg.lr:g} is over {lr_max:g}, the most {cfg.model} takes well (its recipe uses "
                     f"{recipe.get('lr', lr_max):g}): fine-tuning a pretrained encoder this fast usually destroys what "
                     "it learnt and ends at the majority class")
    return notes


def size_defaults(cfg: ClassifyConfig, n_train: int, user: set[str]) -> list[str]:
    """Batch size, epochs and early stopping from the training set's size, for the fields the user left unset
    (`user`: the fields they set): think in optimizer steps, not epochs, so a small data set still gets enough."""
    recipe = get_entry(cfg.model).recipe or {}
    notes = []
    if "batch_size" not in user:
        fit = max(MIN_BATCH, 2 ** int(math.log2(max(1, n_train / EXAMPLES_PER_BATCH))))
        if fit < cfg.batch_size:
            notes.append(f"batch_size {fit} (not {cfg.batch_size}: {n_train} training examples)")
            cfg.batch_size = fit
    if "epochs" not in user:
        steps = max(1, math.ceil(n_train / cfg.batch_size))
        want = min(recipe.get("max_epochs", MAX_EPOCHS), math.ceil(recipe.get("min_steps", MIN_STEPS) / steps))
        if want > cfg.epochs:
            notes.append(f"epochs {want} (not {cfg.epochs}: at {steps} steps an epoch, {want * steps} steps in all)")
            cfg.epochs = want
            if "early_stop" not in user and cfg.early_stop is None:
                cfg.early_stop = max(3, want // 4)
                notes.append(f"early_stop {cfg.early_stop} (the longer run stops once {cfg.monitor} stops improving)")
    return notes


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


# ----------------------------------------------------------------------------------------------------------------
# --model auto: train the candidates, keep the best on the validation split


def auto_candidates() -> list[str]:
    """The models `--model auto` compares (BENCHMARKS.md, issue 11, has the measurements behind the choice): the bag
    of n-grams, strong on a few hundred texts and seconds to train, and the pretrained MiniLM encoder, which wins
    from about a thousand texts on; a from-scratch recurrent net where MiniLM's files are not installed."""
    from nnforge.models.text import packaged_minilm_dir

    try:
        packaged_minilm_dir()
        return ["fasttext", "minilm"]
    except (ModuleNotFoundError, FileNotFoundError):
        return ["fasttext", "bigru"]


def _install_winner(run: Run, src: Path) -> None:
    """Move the chosen candidate's training into the run folder itself: checkpoints, curves, tokenizer."""
    for name in ("checkpoints", "tb"):
        if (src / name).exists():
            shutil.rmtree(run.path / name, ignore_errors=True)
            shutil.move(str(src / name), str(run.path / name))
    for name in ("metrics.csv", "tokenizer.json", "data_report.json", "split.json"):
        if (src / name).exists():
            shutil.copy2(src / name, run.path / name)


def train_auto(task: ClassifyTask, cfg: ClassifyConfig, run: Run, device: torch.device) -> dict:
    """Each candidate trains in RUN/candidates/<model> from the user's own settings plus its recipe; the one with
    the best monitored validation value is moved into RUN; the others keep their curves and configs, not their
    weights. Returns the choice, for meta.json and the report."""
    from nnforge.engine.loop import fit, monitor_mode

    user = cfg.model_dump(exclude_unset=True)
    results, states = {}, {}
    for name in auto_candidates():
        sub = type(cfg)(**{**user, "model": name, "out": cfg.out, "name": cfg.name})
        folder = run.path / "candidates" / name
        folder.mkdir(parents=True, exist_ok=True)
        sub_run = Run(folder)
        _log(f"auto: candidate {name}")
        t0 = time.perf_counter()
        built = task.build(sub, sub_run, device)
        save_config(sub, folder / "config.yaml")
        sub_run.write_json("meta.json", {"task": task.name, **built.meta, **built.trainable.meta})
        mode = monitor_mode(sub, built.trainable.directions)
        state = fit(built.trainable, sub, sub_run, device=device)
        results[name] = {"best": state.best, "epoch": state.best_epoch, "seconds": round(time.perf_counter() - t0, 1),
                         "config": {k: getattr(sub, k) for k in ("lr", "batch_size", "epochs", "max_len")}}
        states[name] = (state.best, sub, built)
        _log(f"auto: {name} best {cfg.monitor} {state.best:.4f} at epoch {state.best_epoch}")
    sign = 1 if mode == "max" else -1
    winner = max(results, key=lambda n: sign * results[n]["best"])
    _install_winner(run, run.path / "candidates" / winner)
    for name in results:
        shutil.rmtree(run.path / "candidates" / name / "checkpoints", ignore_errors=True)
    _, win_cfg, win_built = states[winner]
    for field in type(cfg).model_fields:  # the run's config is now the winner's: a resume trains it further
        setattr(cfg, field, getattr(win_cfg, field))
    why = (f"best {cfg.monitor} on the validation split: " + ", ".join(
        f"{n} {r['best']:.4f} ({r['seconds']:.0f} s)" for n, r in results.items()))
    _log(f"auto: chose {winner}: {why}")
    rows = "".join(f"<tr><td>{n}</td><td>{r['best']:.4f}</td><td>{r['epoch']}</td><td>{r['seconds']:.0f}</td>"
                   f"<td>{'chosen' if n == winner else ''}</td></tr>" for n, r in results.items())
    add_section(run.path, "auto", "Model choice (--model auto)",
                f"<p>Each candidate trained on the same split; the best {cfg.monitor} on the validation split "
                f"wins. Their curves and configs are in candidates/.</p><table><tr><th>candidate</th>"
                f"<th>best {cfg.monitor}</th><th>epoch</th><th>seconds</th><th></th></tr>{rows}</table>")
    return {"auto": {"chose": winner, "why": why, "candidates": results}, **win_built.meta,
            **win_built.trainable.meta}


class ClassifyTask:
    name = "classify"
    configs = {name: t.config for name, t in INPUTS.items()}

    def build(self, cfg: ClassifyConfig, run: Run, device: torch.device) -> Built:
        if cfg.model == "auto":
            return self._build_auto(cfg, run, device)
        resuming = run.checkpoint("last").is_file()
        user = user_fields(cfg)
        notes = apply_recipe(cfg, user)
        data = load_data(cfg)
        notes += size_defaults(cfg, int(data.labels("train").numel()), user)
        for note in notes:  # before training: what was chosen for this run, and why
            _log(note if note.startswith("WARNING") else f"default: {note}")
        if hasattr(data, "save_artifacts") and run.writer:
            data.save_artifacts(run.path)  # e.g. the text tokenizer, reloaded with the run
        match_normalisation(cfg, data)
        model, kwargs = build_model(cfg, data, resuming)
        if isinstance(model, LearnsFromData) and not resuming:  # statistics of the training inputs (e.g. idf)
            model.fit_to_data(data.train_inputs())
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
                "data_fingerprint": data.report.get("fingerprint"), "defaults": notes}
        return Built(trainable, meta, evaluate_after=bool(data.labels("test").numel()))

    def _build_auto(self, cfg: ClassifyConfig, run: Run, device: torch.device) -> Built:
        """--model auto: training is the candidates' (train_auto), run as the task's own loop; meta.json and
        config.yaml are rewritten with the winner's once it is known."""
        built = Built(None, {"auto": {"candidates": auto_candidates()}}, evaluate_after=True)

        def train(resume: bool) -> None:
            meta = {**run.read_json("meta.json"), **train_auto(self, cfg, run, device)}
            meta["model"] = cfg.model
            run.write_json("meta.json", meta)
            save_config(cfg, run.path / "config.yaml")
            built.evaluate_after = bool(run.read_json("split.json").get("test"))

        built.train = train
        return built

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


def compare_with_baseline(run: Run, items: list[str], labels: list[str], accuracy: float) -> dict | None:
    """TF-IDF + logistic regression fitted on the run's training split, scored on the evaluated items, put beside
    the neural model in eval/report.json and report.html, with a plain sentence when the neural model is worse."""
    from nnforge.evaluation.baseline import text_baseline

    try:
        splits = run.read_json("split.json")
    except FileNotFoundError:
        return None
    train, val = splits.get("train") or [], splits.get("val") or []
    if len({y for _, y in train}) < 2:
        return None
    b = text_baseline([t for t, _ in train], [y for _, y in train], [t for t, _ in val], [y for _, y in val],
                      items, labels)
    b.pop("predictions")
    gap = accuracy - b["test_accuracy"]
    b["neural_minus_baseline"] = gap
    verdict = (f"The neural model is <b>{-100 * gap:.1f} points below</b> this linear baseline: on data of this size "
               "a bag of n-grams is hard to beat; train with --model fasttext (or --model auto, which compares "
               "candidates on the validation split)." if gap < 0 else
               f"The neural model is {100 * gap:+.1f} points against this linear baseline.")
    add_section(run.path, "baseline", "Linear baseline",
                f"<p>{b['model']} (C {b['C']:g}, chosen on the validation split), fitted on the same "
                f"{b['n_train']} training texts in {b['seconds']:.1f} s: test accuracy <b>{b['test_accuracy']:.4f}"
                f"</b> against the neural model's {accuracy:.4f} on the same {b['n_test']} texts.</p><p>{verdict}</p>")
    _log(f"baseline: tfidf + logistic regression {b['test_accuracy']:.4f} on the same test items "
         f"({100 * gap:+.1f} points for the neural model)" + ("  <- the neural model is worse" if gap < 0 else ""))
    return b


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
    if INPUTS[loaded.input.name].baseline:
        report["baseline"] = compare_with_baseline(run, [str(i) for i, _ in keep],
                                                   [loaded.classes[y] for _, y in keep], report["accuracy"])
        run.write_json("eval/report.json", {**run.read_json("eval/report.json"), "baseline": report["baseline"]})
    acc = report["accuracy"]
    _log(f"evaluate: {len(keep)} examples, accuracy {acc:.4f}"
         + "".join(f", top-{k} {v:.4f}" for k, v in report.get("top_k_accuracy", {}).items())
         + (f" ({len(skipped)} unreadable skipped)" if skipped else "") + f"; details in {run.eval_dir}")
    _log(f"report: {write_report(run.path)}")
    return report
