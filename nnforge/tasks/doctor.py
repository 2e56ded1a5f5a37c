"""The training-recipe doctor: quick checks that catch a broken setup before an hour of training.

    nnforge doctor --data data/fashion-mnist          # PASS / WARN / FAIL per check; exit status 1 on a FAIL
    report = nnforge.api.doctor("image", data="data/fashion-mnist", model="seed_cnn")   # doctor.json's dict

A disciplined recipe, in order: look at the data (class counts, duplicates, leaks between splits, corrupt
files, sizes), look at one batch exactly as the model receives it, compare the loss at initialisation with
ln(classes), sweep the learning rate, make sure real inputs beat zeroed ones, and overfit one small batch.

Every training check starts from a copy of one seeded initial model, runs in fp32 and uses plain
cross-entropy: label smoothing puts a floor under the loss (a smoothed target is never fitted to zero loss,
and it moves the loss away from ln K) and class weights change what chance level means, so both are left out.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnforge.config import ClassifyConfig, EngineConfig
from nnforge.engine.device import resolve_device
from nnforge.engine.optim import build_optimizer
from nnforge.engine.seeding import seed_everything
from nnforge.tasks._doctor_data import Check, batch_check, data_checks
from nnforge.tasks.classify import (
    apply_recipe,
    auto_candidates,
    build_model,
    load_data,
    match_normalisation,
    size_defaults,
    user_fields,
)

GROUPS = ("data", "batch", "init_loss", "lr_range", "baseline", "overfit")
INIT_BATCHES = 4  # batches averaged for the loss at initialisation
# The loss at init exceeds ln K by about sigma^2 / 2 when the logits spread with std sigma. 0.5 nats (sigma
# ~1): the untrained model already prefers some classes e-fold; 2 nats (sigma ~2, odds up to ~50:1): it starts
# confidently wrong, and the first epochs go to undoing the initialisation.
INIT_WARN, INIT_FAIL = 0.5, 2.0
# 8 LRs per decade over 5 decades; SGD wants about 10x the LR of Adam, so its sweep sits a decade higher.
LR_STEPS, LR_RANGE = 40, {"adamw": (1e-5, 1.0), "sgd": (1e-4, 10.0)}
LR_SMOOTH = 5  # points in the centred moving average; centred, so the minimum does not drift to higher LRs
# 20 steps of at most 128 examples: the question is whether the input helps at all, not how fast the recipe
# trains, and a model that uses its input is well ahead of a blind one by then.
BASELINE_STEPS, BASELINE_BATCH, HELDOUT_MAX = 20, 128, 1024
BASELINE_MIN_GAIN = 0.05  # nats per held-out example real inputs must win by, besides 2 standard errors
# A healthy model fits 16 examples in tens of steps; the budget is several times that, and a try stops early
# once the loss has not improved by 1% in OVERFIT_PATIENCE steps (stuck: more steps would not help).
OVERFIT_N, OVERFIT_STEPS, OVERFIT_PATIENCE = 16, 200, 40
OVERFIT_TARGET = 0.05  # loss 0.05: ~95% probability on each true class


def format_check(c: Check) -> str:
    return f"{c.status:<5} {c.name:<16} {c.message}" + (f"\n{'':23}-> {c.advice}" if c.advice else "")


# ------------------------------------------------------------------------------------------------------------
# training checks


def _stream(source, cap: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches, epoch after epoch, for as many steps as a check takes; at most `cap` examples
    of each (batches come in random order, so their first examples are a random sample)."""
    for epoch in itertools.count():
        for x, y in source.epoch(epoch):
            yield x[:cap], y[:cap]


def _optimizer(model: nn.Module, cfg: EngineConfig, lr: float) -> torch.optim.Optimizer:
    opt = build_optimizer(model, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    return opt


def _step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, clip: float | None) -> float:
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def init_loss_check(model: nn.Module, batches: list, k: int) -> Check:
    model.train()  # as the first training step sees it (BatchNorm on batch statistics)
    losses, spread = [], []
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).float()
            if logits.shape != (len(y), k):
                return Check("init_loss", "FAIL", f"the model returns {tuple(logits.shape)} for a batch of "
                             f"{len(y)}; expected ({len(y)}, {k})", "the head must give one logit per class")
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            spread.append(logits.std(1))
    loss, sigma, ref = torch.cat(losses).mean().item(), torch.cat(spread).mean().item(), math.log(k)
    excess = loss - ref
    details = {"loss": loss, "ln_k": ref, "excess_nats": excess, "logit_std": sigma}
    msg = f"loss at init {loss:.3f} vs ln({k}) = {ref:.3f} (logits spread {sigma:.2f})"
    if not math.isfinite(loss):
        return Check("init_loss", "FAIL", msg, "the untrained model already gives a non-finite loss: look "
                     "for log(0), a division by zero or inputs that are not normalised", details)
    if excess > INIT_FAIL:
        return Check("init_loss", "FAIL", f"{msg}: {excess:.2f} nats too high, confidently wrong at start",
                     "shrink the initial logits (a smaller init or output scale of the last layer); check "
                     "that inputs are normalised and labels are class indices", details)
    if excess > INIT_WARN:
        return Check("init_loss", "WARN", f"{msg}: {excess:.2f} nats above chance",
                     "a well-initialised classifier starts near uniform predictions: initialise the last "
                     "layer smaller", details)
    if excess < -INIT_WARN:
        return Check("init_loss", "WARN", f"{msg}: {-excess:.2f} nats better than chance untrained",
                     "an untrained model should not beat chance: look for labels leaking into the inputs",
                     details)
    return Check("init_loss", "PASS", msg, "", details)


def _smooth(v: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    return np.array([v[max(0, i - half):i + half + 1].mean() for i in range(len(v))])


def lr_range_check(model: nn.Module, stream, cfg: EngineConfig, folder: Path) -> tuple[Check, float | None]:
    """Loss against an exponentially growing LR, one training step per LR, until the loss blows up.

    Suggested LR = a tenth of the LR at the lowest smoothed loss. That minimum is the edge of instability
    (just past it the loss climbs), so a decade below is about the largest LR that still falls steadily, and
    nnforge's schedules warm up to it. The steepest-descent LR is reported too, but as the slope of a noisy
    curve it moves with the noise and with where the sweep starts, so it is not the one suggested.
    """
    lrs = np.geomspace(*LR_RANGE[cfg.optimizer], LR_STEPS)
    opt = _optimizer(model, cfg, lrs[0])
    model.train()
    losses: list[float] = []
    for lr, (x, y) in zip(lrs, stream, strict=False):
        for g in opt.param_groups:
            g["lr"] = float(lr)
        loss = _step(model, opt, x, y, cfg.clip_grad)
        if not math.isfinite(loss):
            break
        losses.append(loss)
        if len(losses) > 10 and loss > 4 * min(losses):
            break  # diverged: the rest of the sweep adds nothing
    n = len(losses)
    if n < 2 * LR_SMOOTH:
        return Check("lr_range", "WARN", f"the loss blew up after {n} steps, at lr {lrs[n]:.2g}",
                     "see the init-loss and overfit checks; try a lower --lr", {"losses": losses}), None
    swept, smooth = lrs[:n], _smooth(np.array(losses), LR_SMOOTH)
    i_min = int(smooth.argmin())
    lr_min = float(swept[i_min])
    lr_steep = float(swept[int(np.gradient(smooth, np.log(swept))[:i_min + 1].argmin())])
    suggested = lr_min / 10
    details = {"lrs": swept.tolist(), "losses": losses, "smoothed": smooth.tolist(), "min_loss_lr": lr_min,
               "steepest_lr": lr_steep, "suggested_lr": suggested, "configured_lr": cfg.lr,
               "diverged": n < LR_STEPS, "rule": "suggested = (LR at the lowest smoothed loss) / 10",
               "picture": "lr_range.png"}
    _lr_plot(swept, losses, smooth, {"min loss": lr_min, "suggested": suggested, "steepest": lr_steep,
                                     "configured": cfg.lr}, folder / "lr_range.png")
    msg = f"suggested lr {suggested:.2g}, a tenth of {lr_min:.2g} where the loss is lowest (lr_range.png)"
    if smooth[i_min] > 0.9 * smooth[0]:
        return Check("lr_range", "WARN", f"the loss fell by under 10% at every lr from {swept[0]:g} to "
                     f"{swept[-1]:.2g}", "the model barely learns at any lr: see the baseline and overfit "
                     "checks", details), None
    if cfg.lr >= lr_min:
        return Check("lr_range", "WARN", f"--lr {cfg.lr:g} is past the lowest-loss lr; {msg}",
                     f"train with --lr {suggested:.2g}: at {cfg.lr:g} the loss is already rising",
                     details), suggested
    if cfg.lr < suggested / 10:
        return Check("lr_range", "WARN", f"--lr {cfg.lr:g} is over 10x below the suggestion; {msg}",
                     f"train with --lr {suggested:.2g}, or expect slow progress", details), suggested
    return Check("lr_range", "PASS", f"--lr {cfg.lr:g} is in range; {msg}", "", details), suggested


def _lr_plot(lrs, losses, smooth, marks: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(lrs, losses, color="0.7", lw=1, label="loss per step")
    ax.plot(lrs, smooth, color="C0", lw=2, label="smoothed")
    for (name, lr), color in zip(marks.items(), ("C3", "C2", "C1", "k"), strict=True):
        ax.axvline(lr, color=color, ls="--", lw=1, label=f"{name} {lr:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (cross-entropy)",
           title="learning-rate range test", ylim=(0, 1.5 * max(losses[0], min(losses)) + 1e-3))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _heldout(data, device) -> tuple[list, str]:
    """Up to HELDOUT_MAX examples of val and test (the doctor picks no model, so test may be looked at); the
    training split when there are neither, which cannot reveal labels that do not follow the inputs."""
    names = [s for s in ("val", "test") if data.labels(s).numel()] or ["train"]
    batches, n = [], 0
    for split in names:
        for x, y in data.eval_batches(split, device):
            batches.append((x[:HELDOUT_MAX - n], y[:HELDOUT_MAX - n]))
            n += len(batches[-1][1])
            if n >= HELDOUT_MAX:
                return batches, "+".join(names)
    return batches, "+".join(names)


@torch.no_grad()
def _heldout_loss(model: nn.Module, batches: list, blind=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses (N,) and logits (N, K) in eval mode."""
    model.eval()
    logits = torch.cat([model(blind(x) if blind else x).float() for x, _ in batches])
    return F.cross_entropy(logits, torch.cat([y for _, y in batches]), reduction="none"), logits


def baseline_check(initial: nn.Module, source, heldout: list, heldout_name: str, cfg: EngineConfig, lr: float,
                   blind: Callable[[torch.Tensor], torch.Tensor]) -> Check:
    """Train one copy on real inputs and one on blind inputs (same init, batches and steps); compare held out.

    Held-out examples, not the training loss: with shuffled labels a model still memorises its training
    batches, but what it learns carries over to no other example.
    """
    real, blinded = copy.deepcopy(initial), copy.deepcopy(initial)
    for model, transform in ((real, None), (blinded, blind)):
        model.train()
        opt = _optimizer(model, cfg, lr)
        for _, (x, y) in zip(range(BASELINE_STEPS), _stream(source, BASELINE_BATCH), strict=False):
            _step(model, opt, transform(x) if transform else x, y, cfg.clip_grad)
    loss_real, logits_real = _heldout_loss(real, heldout)
    loss_blind, _ = _heldout_loss(blinded, heldout, blind)
    _, logits_real_blind = _heldout_loss(real, heldout, blind)
    y = torch.cat([b[1] for b in heldout])
    gain = loss_blind - loss_real  # (N,) nats; > 0 where the real input helped
    n = len(gain)
    mean, se = gain.mean().item(), (gain.std().item() / math.sqrt(n) if n > 1 else math.inf)
    change = (logits_real - logits_real_blind).abs().max().item()
    details = {"steps": BASELINE_STEPS, "batch_at_most": BASELINE_BATCH, "lr": lr, "heldout": heldout_name,
               "n": n,
               "loss_real": loss_real.mean().item(), "loss_blind": loss_blind.mean().item(),
               "acc_real": (logits_real.argmax(1) == y).float().mean().item(), "gain_nats": mean,
               "gain_se": se, "output_change_on_blind_input": change}
    msg = (f"after {BASELINE_STEPS} steps, {heldout_name} loss {details['loss_real']:.3f} on real inputs vs "
           f"{details['loss_blind']:.3f} on zeroed ones (n={n})")
    if change <= 1e-6 * (1 + logits_real.abs().max().item()):
        return Check("baseline", "FAIL", f"{msg}: the output does not depend on the input",
                     "the model is not using its input: look for a forward() that drops x, or a detached, "
                     "zeroed or disconnected branch", details)
    if mean > 2 * se and mean > BASELINE_MIN_GAIN:
        return Check("baseline", "PASS", msg, "", details)
    return Check("baseline", "FAIL", f"{msg}: real inputs do not help ({mean:+.3f} ± {se:.3f} nats)",
                 "the model reads its input but learns nothing that carries over to other examples: check "
                 "that labels match their inputs (shuffled or misaligned labels, a wrong label column), then "
                 "the lr", details)


def overfit_check(initial: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EngineConfig,
                  lrs: list[float]) -> Check:
    """Fit OVERFIT_N examples (as they came in the first augmented batch, then fixed) to near-zero loss."""
    x, y = x[:OVERFIT_N], y[:OVERFIT_N]
    tries = []
    for lr in lrs:  # a second lr (the suggested one) tells "lr too low" apart from a bug
        model = copy.deepcopy(initial).train()
        opt = _optimizer(model, cfg, lr)
        losses: list[float] = []
        best, best_at, stop = math.inf, 0, "budget"
        while len(losses) < OVERFIT_STEPS:
            losses.append(_step(model, opt, x, y, cfg.clip_grad))
            if losses[-1] < OVERFIT_TARGET or not math.isfinite(losses[-1]):
                stop = "target" if losses[-1] < OVERFIT_TARGET else "diverged"
                break
            if losses[-1] < 0.99 * best:
                best, best_at = losses[-1], len(losses)
            elif len(losses) - best_at >= OVERFIT_PATIENCE:
                stop = "plateau"
                break
        tries.append({"lr": lr, "steps": len(losses), "loss": losses[-1], "stopped": stop,
                      "every_10th": losses[::10]})
        if losses[-1] < OVERFIT_TARGET:
            break
    details = {"examples": len(y), "classes": len(set(y.tolist())), "target": OVERFIT_TARGET, "tries": tries}
    last = tries[-1]
    if last["loss"] < OVERFIT_TARGET:
        msg = (f"fitted {len(y)} examples to loss {last['loss']:.3f} in {last['steps']} steps "
               f"at lr {last['lr']:.2g}")
        if len(tries) > 1:
            return Check("overfit", "WARN", f"{msg}, not at --lr {lrs[0]:g} (loss {tries[0]['loss']:.3f})",
                         f"--lr {lrs[0]:g} is too low to learn even one batch: use the suggested lr", details)
        return Check("overfit", "PASS", msg, "", details)
    got = ", ".join(f"{t['loss']:.3f} at lr {t['lr']:.2g}" for t in tries)
    return Check("overfit", "FAIL", f"could not fit {len(y)} examples (at most {OVERFIT_STEPS} steps): loss "
                 f"{got} (target {OVERFIT_TARGET})", "a model or loss bug: look for a softmax or log-softmax "
                 "before the loss, a frozen or detached layer, or a model too small for its input", details)


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """A check whose model or data code raises reports FAIL with the error instead of stopping the doctor."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reporting whatever the model does is the doctor's job
        first = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return Check(name, "FAIL", f"raised {first}", "fix the model or data so one forward and backward "
                     "step runs (the traceback is in doctor.json)", {"traceback": traceback.format_exc()})


# ------------------------------------------------------------------------------------------------------------
# the examination


def default_folder(cfg: ClassifyConfig) -> Path:
    return Path("runs") / "doctor" / (cfg.name or Path(cfg.data).stem or "data")


def _initial_model(cfg: ClassifyConfig, data, model: nn.Module | None, device: torch.device) -> nn.Module:
    seed_everything(cfg.seed)
    if model is not None:
        return copy.deepcopy(model).to(device)
    return build_model(cfg, data)[0].to(device)


def run_doctor(cfg: ClassifyConfig, out: str | Path | None = None, model: nn.Module | None = None,
               only: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the checks, print each as it finishes, write doctor.json and the pictures; return the report.

    out: the doctor's folder (default runs/doctor/<name, or the data folder's name>).
    model: an nn.Module to examine instead of cfg.model (copied; the object passed in is never trained).
    only: a subset of GROUPS. Without lr_range, baseline and overfit use the configured lr.
    """
    unknown = sorted(set(only or ()) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown doctor checks {unknown}; choose from {', '.join(GROUPS)}")
    t0 = time.perf_counter()
    folder = Path(out) if out is not None else default_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if cfg.model == "auto" and model is None:  # the candidate whose recipe matters most: the pretrained encoder
        cfg.model = auto_candidates()[-1]
        log(f"doctor: --model auto trains several candidates; examining {cfg.model}")
    # the doctor examines what training would use: the model's recipe and the data-size defaults
    user = user_fields(cfg)
    notes = apply_recipe(cfg, user) if model is None else []
    data = load_data(cfg)
    notes += size_defaults(cfg, int(data.labels("train").numel()), user) if model is None else []
    for note in notes:
        log(note if note.startswith("WARNING") else f"default: {note}")
    match_normalisation(cfg, data)  # the doctor looks at the batches training would see
    checks: list[Check] = []
    clock = [time.perf_counter()]

    def add(c: Check) -> Check:
        now = time.perf_counter()
        c.details["seconds"] = round(now - clock[0], 3)
        clock[0] = now
        checks.append(c)
        log(format_check(c))
        return c

    _examine(cfg, data, model, device, folder, set(only or GROUPS), add)
    tally = Counter(c.status for c in checks)
    status = "FAIL" if tally["FAIL"] else "WARN" if tally["WARN"] else "PASS"
    report = {
        "status": status, "counts": {s: tally.get(s, 0) for s in ("PASS", "WARN", "FAIL")},
        "task": "classify", "input": data.kind, "data": str(cfg.data), "classes": data.classes,
        "model": type(model).__name__ if model is not None else cfg.model,
        "device": str(device), "folder": str(folder), "seconds": round(time.perf_counter() - t0, 2),
        "note": "training checks: fp32, plain cross-entropy (no label smoothing, no class weights), "
                "copies of one seeded initial model",
        "checks": [asdict(c) for c in checks],
        "config": cfg.model_dump(mode="json"),
    }
    (folder / "doctor.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"doctor: {status}: {tally['PASS']} pass, {tally['WARN']} warn, {tally['FAIL']} fail in "
        f"{report['seconds']:.1f}s; details in {folder / 'doctor.json'}")
    return report


def _examine(cfg, data, model: nn.Module | None, device, folder: Path, wanted: set[str],
             add: Callable[[Check], Check]) -> None:
    if "data" in wanted:
        for c in data_checks(data, cfg):
            add(c)
    if not wanted - {"data"}:
        return
    source = data.train_source(device)
    # the first full training batch, augmented and normalised (a text epoch may start with its short batch)
    full = min(cfg.batch_size, len(data.labels("train")))
    x0, y0 = next(((x, y) for x, y in source.epoch(0) if len(y) >= full), None) or next(iter(source.epoch(0)))
    if "batch" in wanted:
        add(batch_check(data, x0, y0, folder))
    if not wanted - {"data", "batch"}:
        return
    initial = _initial_model(cfg, data, model, device)  # a bad model name is an error here, not a FAIL

    def fresh() -> nn.Module:
        return copy.deepcopy(initial)

    if "init_loss" in wanted:
        batches = list(itertools.islice(_stream(source), min(INIT_BATCHES, len(source))))
        add(_guard("init_loss", lambda: init_loss_check(fresh(), batches, len(data.classes))))
    suggested, lr = None, cfg.lr
    if "lr_range" in wanted:
        found: dict[str, float | None] = {}

        def lr_range() -> Check:
            check, found["lr"] = lr_range_check(fresh(), _stream(source), cfg, folder)
            return check

        verdict = add(_guard("lr_range", lr_range))
        suggested = found.get("lr")
        if suggested is not None and verdict.status != "PASS":
            lr = suggested  # baseline and overfit examine the model and data, not a badly chosen lr
    if "baseline" in wanted:
        heldout, name = _heldout(data, device)
        add(_guard("baseline", lambda: baseline_check(fresh(), source, heldout, name, cfg, lr, data.blind)))
    if "overfit" in wanted:
        far = suggested is not None and (cfg.lr <= 0 or abs(math.log(suggested / cfg.lr)) > math.log(3))
        lrs = [cfg.lr, suggested] if far else [cfg.lr]
        add(_guard("overfit", lambda: overfit_check(fresh(), x0, y0, cfg, lrs)))
