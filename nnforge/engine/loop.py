"""The training engine: any task's step, and everything around it.

    trainable = Trainable(modules={"model": net}, optimizers={"model": OptimSpec.from_config(cfg)}, step=step,
                          source=source, validate=validate, directions={"val_acc": "max", "val_loss": "min"})
    state = fit(trainable, cfg, run, device=device)

The task supplies the step: `step(models, batch, ctx) -> (n, metrics)` trains on one batch. It runs its forward
passes under `with ctx.autocast():`, calls `ctx.update(loss)` once per optimizer (`ctx.update(loss_d, "d")` where
there are several: backward, gradient clipping, the optimizer step), and returns how many examples the batch held
and its metrics as scalar tensors ({"loss": ..., "acc": ...}), which the engine averages over the epoch and logs
as train_<name>. The engine owns the rest and knows nothing of a particular family: devices, bf16 autocast,
channels-last, torch.compile, EMA copies, LR schedules (plain functions of the step), progress with rate and ETA,
validation and metrics.csv/TensorBoard after every epoch, the best checkpoint by any logged metric and direction,
early stopping, exact resume mid-epoch, Ctrl-C/SIGTERM checkpoints and NaN stops that never touch `best`.

`source` yields batches already on the device: the data layer owns decoding, augmentation and placement.
Everything random in a batch is derived from (seed, epoch, batch index), and the global RNGs are saved in each
checkpoint, so a resumed run repeats the uninterrupted one exactly on the CPU.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from nnforge.config import ConfigError, EngineConfig
from nnforge.engine import distributed
from nnforge.engine.checkpoint import load_checkpoint, save_checkpoint
from nnforge.engine.device import autocast, resolve_precision
from nnforge.engine.errors import TrainingDiverged, TrainingInterrupted
from nnforge.engine.optim import OptimSpec, build_optimizer, optimizer_from_flat, optimizer_to_flat
from nnforge.engine.progress import Progress
from nnforge.engine.run import Run
from nnforge.engine.schedule import lr_at
from nnforge.engine.seeding import rng_state, set_rng_state

RESERVED = ("optim", "rng")  # checkpoint tensor prefixes the engine uses itself: not module names


class BatchSource(Protocol):
    def __len__(self) -> int: ...  # batches per epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]: ...


class StepContext:
    """What a task's step gets from the engine: the autocast policy and the update of an optimizer."""

    def __init__(self, device: torch.device, amp_dtype, optimizers: dict[str, torch.optim.Optimizer],
                 params: dict[str, list[nn.Parameter]], clip: float | None):
        self.device, self.amp_dtype, self.clip = device, amp_dtype, clip
        self.optimizers, self.params = optimizers, params
        self._sole = next(iter(optimizers)) if len(optimizers) == 1 else None

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def update(self, loss: torch.Tensor, optimizer: str | None = None) -> None:
        """backward, clip the gradient norm of the optimizer's parameters, step, zero the gradients."""
        name = optimizer or self._sole
        if name is None:
            raise ValueError(f"this task has several optimizers ({', '.join(self.optimizers)}); name one")
        loss.backward()
        if self.clip:
            nn.utils.clip_grad_norm_(self.params[name], self.clip)
        opt = self.optimizers[name]
        opt.step()
        opt.zero_grad(set_to_none=True)


Step = Callable[[dict[str, nn.Module], Any, StepContext], tuple[int, dict[str, torch.Tensor]]]


@dataclass
class Trainable:
    """What a task hands the engine: named modules, their optimizers, a step, batches and a validation."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, OptimSpec]
    step: Step
    source: BatchSource
    validate: Callable[[dict[str, nn.Module]], dict[str, float]]  # after every epoch, models in eval copies incl.
    directions: dict[str, str] = field(default_factory=dict)  # logged metric -> "max" | "min" (monitor's default)
    ema: dict[str, str] = field(default_factory=dict)  # EMA copy name -> module it follows (made when cfg.ema)
    before_epoch: Callable[[int, dict[str, nn.Module]], None] | None = None  # e.g. freeze a body for N epochs
    state: dict = field(default_factory=dict)  # the task's own small JSON state, saved and restored with checkpoints
    meta: dict = field(default_factory=dict)  # written into every checkpoint: what loading the model needs


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches done in the unfinished epoch (non-zero only after an interruption)
    best: float | None = None
    best_loss: float | None = None  # val_loss at the best epoch: breaks ties of a coarse monitor (accuracy)
    best_epoch: int = 0
    bad_epochs: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # the unfinished epoch's metric sums, to resume exactly
    seen: int = 0
    stopped: str | None = None  # early_stop | interrupted | None
    elapsed_s: float = 0.0  # wall time spent in fit so far (training, validation, saves), across resumes

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        d = dict(d)
        if "loss_sum" in d:  # a checkpoint from before task steps: classification's two running sums
            d["sums"] = {"loss": d.pop("loss_sum"), "acc": float(d.pop("correct", 0))}
        return cls(**d)


class StopFlag:
    """Ctrl-C / SIGTERM ask for a stop at the next step boundary; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the next step, then stopping "
              "(Ctrl-C again to stop now)", file=sys.stderr)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class EMA:
    """Exponential moving average of a module's weights; buffers (BatchNorm statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warmup: early weights are noise
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints of named modules and optimizers (also for tasks whose algorithm is its own loop)


def checkpoint_tensors(modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of every module, optimizer and global RNG: module weights under "<name>.", optimizer
    state under "optim.<name>.", RNG states under "rng."."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_json = {}
    for name, opt in optimizers.items():
        t, opt_json[name] = optimizer_to_flat(opt, f"optim.{name}.")
        tensors.update(t)
    rng_t, rng_j = rng_state()
    tensors.update(rng_t)
    return tensors, {"optimizers": opt_json, "rng": rng_j}


def restore_checkpoint(path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], device,
                       initial_copies: dict[str, str] | None = None) -> dict:
    """Load modules, optimizers and RNGs from a checkpoint; returns its JSON. initial_copies: {module: source}
    for modules a checkpoint may lack (an EMA added on resume), which then start as a copy of their source."""
    tensors, meta = load_checkpoint(path)
    for name, m in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if not sd and name in (initial_copies or {}):
            sd = modules[initial_copies[name]].state_dict()
        m.load_state_dict(sd)
    if "optimizers" in meta:
        for name, opt in optimizers.items():
            optimizer_from_flat(opt, tensors, meta["optimizers"][name], device, f"optim.{name}.")
    else:  # a checkpoint from before named optimizers: one optimizer, state under "optim.<param id>."
        (opt,) = optimizers.values()
        optimizer_from_flat(opt, tensors, meta["optimizer"], device)
    set_rng_state(tensors, meta["rng"])
    return meta


# ----------------------------------------------------------------------------------------------------------------
# the loop


def _better(value: float, best: float | None, mode: str, loss: float | None = None,
            best_loss: float | None = None) -> bool:
    """Is this epoch better than the best so far? A tie of the monitored value (accuracy moves in steps of
    1/len(val): on a small or imbalanced validation split it can sit at the majority share for many epochs while the
    model learns) goes to the lower validation loss, so learning past the first tied epoch is kept."""
    if best is None:
        return True
    if value == best and loss is not None and best_loss is not None:
        return loss < best_loss
    return value < best if mode == "min" else value > best


def monitor_mode(cfg: EngineConfig, directions: dict[str, str]) -> str:
    """max or min for cfg.monitor: the config's choice, else the task's declaration, else min for a *loss."""
    if cfg.monitor_mode != "auto":
        return cfg.monitor_mode
    if cfg.monitor in directions:
        return directions[cfg.monitor]
    if cfg.monitor.endswith("loss"):
        return "min"
    known = ", ".join(f"{k} ({v})" for k, v in directions.items()) or "none declared"
    raise ConfigError(f"monitor '{cfg.monitor}': this task's validation metrics are {known}; pick one, or set "
                      "monitor_mode to max or min for another logged metric")


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _channels_last(batch):
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    if isinstance(batch, tuple | list):
        return type(batch)(_channels_last(b) for b in batch)
    return batch


def fit(trainable: Trainable, cfg: EngineConfig, run: Run, *, device: torch.device,
        resume_from: str | None = None, on_epoch: Callable[[dict], None] | None = None) -> TrainState:
    """Train for cfg.epochs, validating, logging and checkpointing after every epoch.

    resume_from: a checkpoint path to continue from (modules, optimizers, EMA, RNG, step, epoch, sums, task state).
    on_epoch: called with each epoch's metrics row once its checkpoint is written (a tuner's pruner reads it; an
    exception it raises ends the run there, the checkpoints intact).
    """
    t = trainable
    bad = [n for n in t.modules if n in RESERVED or "." in n]
    if bad:
        raise ValueError(f"module names {bad} are reserved or contain a dot")
    mode = monitor_mode(cfg, t.directions)
    amp_dtype = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last and device.type != "mps"
    modules = dict(t.modules)
    for m in modules.values():
        m.to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes repeat (the ragged last batch is dropped): tune once
    params = {name: [p for m in spec.modules for p in modules[m].parameters()] for name, spec in t.optimizers.items()}
    opts = {name: build_optimizer([modules[m] for m in spec.modules], spec) for name, spec in t.optimizers.items()}
    emas = {name: EMA(modules[src], cfg.ema) for name, src in t.ema.items()} if cfg.ema else {}
    modules.update({name: e.model for name, e in emas.items()})
    state = TrainState()
    if resume_from:
        meta = restore_checkpoint(resume_from, modules, opts, device, initial_copies=t.ema)
        state = TrainState.from_json(meta["state"])
        state.stopped = None
        t.state.update(meta.get("task_state") or {})
        run.truncate_metrics(state.epoch)
    trained = {n: m for n, m in modules.items() if n not in emas}
    world = distributed.world()
    if resume_from and not world.main:
        # the checkpoint's sums are the whole world's: counted once, by rank 0. The other ranks keep the same keys
        # at zero, so every rank sums the same tensors even when the stop came after an epoch's last batch (no
        # batch left to add the keys: the ranks' collectives no longer matched and the resume aborted or hung)
        state.sums, state.seen = dict.fromkeys(state.sums, 0.0), 0
    views = {n: world.wrap(m, device) for n, m in trained.items()}
    views = {n: torch.compile(m) for n, m in views.items()} if cfg.compile else views
    views.update({n: e.model for n, e in emas.items()})
    ctx = StepContext(device, amp_dtype, opts, params, cfg.clip_grad)
    steps_per_epoch = len(t.source)
    total_steps = cfg.epochs * steps_per_epoch
    warmups = {n: int(s.warmup_epochs * steps_per_epoch) for n, s in t.optimizers.items()}
    prec = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    procs = (f", {world.size} processes ({cfg.batch_size // world.size} rows of each batch per process, the lr "
             "for the whole batch)" if world.distributed else "")
    say = print if world.main else (lambda *a, **k: None)
    say(f"training on {device} ({prec}{', channels_last' if channels_last else ''}): "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size}{procs}", file=sys.stderr)
    if state.epoch >= cfg.epochs:
        say(f"{run.path} already has {state.epoch} epochs; pass a larger --epochs to extend it", file=sys.stderr)
        return state

    def lrs_at(step: int) -> dict[str, float]:
        return {n: lr_at(step, total_steps, s.lr, warmups[n], s.schedule) for n, s in t.optimizers.items()}

    def save(*which: str) -> None:
        if not world.main:
            return
        tensors, extra = checkpoint_tensors(modules, opts)
        meta = dict(t.meta, state=asdict(state), config=cfg.model_dump(mode="json"), task_state=t.state, **extra)
        save_checkpoint([run.checkpoint(w) for w in which], tensors, meta)

    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    run_start = time.perf_counter()
    epochs_at_start, elapsed_at_start = state.epoch, state.elapsed_s
    with StopFlag() as stop:
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            if t.before_epoch:
                t.before_epoch(epoch, modules)
            for m in trained.values():
                m.train()
            sums = {k: torch.tensor(v, dtype=acc_dtype, device=device) for k, v in state.sums.items()}
            seen = seen_at_start = state.seen
            t0 = time.perf_counter()
            bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", "step", initial=state.batch_in_epoch,
                           quiet=not world.main)
            lrs = lrs_at(max(0, state.step - 1))  # logged if no step runs
            for batch in t.source.epoch(epoch, start=state.batch_in_epoch):
                lrs = lrs_at(state.step)
                for name, opt in opts.items():
                    for g in opt.param_groups:
                        g["lr"] = lrs[name]
                if channels_last:
                    batch = _channels_last(batch)
                n, metrics = t.step(views, world.shard(batch), ctx)
                for name, e in emas.items():
                    e.update(modules[t.ema[name]], state.step)
                state.step += 1
                state.batch_in_epoch += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().to(acc_dtype) * n
                seen += n
                if state.step % cfg.log_every == 0 or state.batch_in_epoch == steps_per_epoch:
                    names = list(sums)
                    totals = world.sum(torch.stack([*(sums[k] for k in names), torch.tensor(
                        float(seen), dtype=acc_dtype, device=device)]))  # one sync per interval, for every process
                    running = dict(zip(names, (totals[:-1] / totals[-1]).tolist(), strict=True))
                    broken = {k: v for k, v in running.items() if not math.isfinite(v)}  # one sync per interval
                    if broken:
                        k, v = next(iter(broken.items()))
                        lr_text = ", ".join(f"{x:.3g}" for x in lrs.values())
                        raise TrainingDiverged(
                            f"{k} became {v} by step {state.step} (epoch {epoch + 1}, lr {lr_text}); "
                            f"stopped without saving, so {run.checkpoint('best')} is untouched. Try a lower --lr, "
                            "a --clip-grad value, or --precision fp32."
                        )
                    rate = (seen - seen_at_start) / max(1e-9, time.perf_counter() - t0)
                    bar.update(0, **{k: f"{v:.4f}" for k, v in running.items()}, ex_s=f"{rate:.0f}")
                bar.update(1)
                if world.any(stop.requested):  # a stop asked of any process stops them all at this step
                    totals = {k: world.sum(v).item() for k, v in sums.items()}
                    state.sums, state.seen = totals, int(world.sum(torch.tensor(seen)).item())
                    state.stopped = "interrupted"
                    state.elapsed_s = elapsed_at_start + time.perf_counter() - run_start
                    save("last")
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped at step {state.step} (epoch {epoch + 1}, batch {state.batch_in_epoch}); "
                        f"continue with: nnforge train ... --resume {run.path}"
                    )
            bar.close()
            epoch_time = time.perf_counter() - t0
            seen = int(world.sum(torch.tensor(seen)).item())  # from here on, the whole world's counts
            seen_at_start = int(world.sum(torch.tensor(seen_at_start)).item())
            train = {f"train_{k}": world.sum(v).item() / max(1, seen) for k, v in sums.items()}
            broken = {k: v for k, v in train.items() if not math.isfinite(v)}
            if broken:
                raise TrainingDiverged(f"{next(iter(broken))} became {next(iter(broken.values()))} in epoch "
                                       f"{epoch + 1}; best checkpoint untouched")
            for m in trained.values():
                m.eval()
            val = t.validate(modules)
            state.elapsed_s = elapsed_at_start + time.perf_counter() - run_start
            state.epoch += 1
            state.batch_in_epoch, state.sums, state.seen = 0, {}, 0
            lr_cols = {"lr": lrs[next(iter(lrs))]} if len(lrs) == 1 else {f"lr_{n}": v for n, v in lrs.items()}
            row = {"epoch": state.epoch, "step": state.step, **lr_cols, **train, **val,
                   "epoch_time_s": round(epoch_time, 3), "elapsed_s": round(state.elapsed_s, 3),
                   "examples_per_s": round((seen - seen_at_start) / max(epoch_time, 1e-9), 1)}
            if world.main:
                run.log_metrics(row)
            if cfg.monitor not in row:
                logged = ", ".join(k for k in row if k not in ("epoch", "step"))
                raise ConfigError(f"monitor '{cfg.monitor}' is not logged by this task; logged: {logged}")
            value = row[cfg.monitor]
            loss = row.get("val_loss") if cfg.monitor != "val_loss" else None
            improved = _better(value, state.best, mode, loss, state.best_loss)
            if improved:
                state.best, state.best_loss, state.best_epoch, state.bad_epochs = value, loss, state.epoch, 0
            else:
                state.bad_epochs += 1
            if cfg.early_stop and state.bad_epochs >= cfg.early_stop and state.epoch < cfg.epochs:
                state.stopped = "early_stop"
            save("last", *(["best"] if improved else []))  # one serialisation for both files
            done = state.epoch - epochs_at_start
            eta = (time.perf_counter() - run_start) / done * (cfg.epochs - state.epoch)
            shown = " ".join(f"{k} {v:.4f}" for k, v in train.items())
            extra = " ".join(f"{k} {v:.4f}" for k, v in val.items())
            say(f"epoch {state.epoch}/{cfg.epochs}  {shown}  {extra}  {row['examples_per_s']:.0f} ex/s  "
                f"{epoch_time:.1f}s{'  *best' if improved else ''}  ETA {_fmt_time(eta)}", file=sys.stderr)
            if on_epoch is not None and world.main:
                on_epoch(row)
            if state.stopped == "early_stop":
                say(f"early stop: {cfg.monitor} has not improved for {state.bad_epochs} epochs", file=sys.stderr)
                break
    run.close()
    return state
