"""The supervised training loop, for any model that maps a batch to class logits.

    state = fit(model, source, evaluate_fn, cfg, run, ckpt_meta={...})

`source` yields (inputs, targets) batches already on the device: the data layer owns decoding, augmentation and
placement, the loop owns optimisation, checkpoints and logging. Everything random in a batch is derived from
(seed, epoch, batch index), and the global RNGs are saved in each checkpoint, so a resumed run repeats the
uninterrupted one exactly on the CPU.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nnforge.config import EngineConfig
from nnforge.engine.checkpoint import load_checkpoint, save_checkpoint
from nnforge.engine.device import autocast, resolve_precision
from nnforge.engine.errors import TrainingDiverged, TrainingInterrupted
from nnforge.engine.optim import build_optimizer, optimizer_from_flat, optimizer_to_flat
from nnforge.engine.progress import Progress
from nnforge.engine.run import Run
from nnforge.engine.schedule import lr_at
from nnforge.engine.seeding import rng_state, set_rng_state


class BatchSource(Protocol):
    def __len__(self) -> int: ...  # batches per epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches done in the unfinished epoch (non-zero only after an interruption)
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    loss_sum: float = 0.0  # the unfinished epoch's running sums, so its metrics resume exactly
    correct: int = 0
    seen: int = 0
    stopped: str | None = None  # early_stop | interrupted | None
    elapsed_s: float = 0.0  # wall time spent in fit so far (training, validation, saves), across resumes


class _StopFlag:
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
    """Exponential moving average of the weights; buffers (BatchNorm statistics) are copied."""

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


def _better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fit(
    model: nn.Module,
    source: BatchSource,
    evaluate: Callable[[nn.Module], dict[str, float]],
    cfg: EngineConfig,
    run: Run,
    *,
    device: torch.device,
    ckpt_meta: dict,
    class_weights: torch.Tensor | None = None,
    head_names: list[str] | None = None,
    resume_from: str | None = None,
) -> TrainState:
    """Train `model` for cfg.epochs, evaluating, logging and checkpointing after every epoch.

    head_names: parameter-name prefixes that stay trainable during cfg.freeze_epochs (if the config has them).
    resume_from: a checkpoint path to continue from (model, optimizer, EMA, RNG, step, epoch, sums).
    """
    amp_dtype = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last and device.type != "mps"
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes repeat (the ragged last batch is dropped): tune once
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    state = TrainState()
    if resume_from:
        state = _restore(resume_from, model, opt, ema, device)
        run.truncate_metrics(state.epoch)
    step_model = torch.compile(model) if cfg.compile else model
    weight = class_weights.to(device) if class_weights is not None else None
    freeze_epochs = getattr(cfg, "freeze_epochs", 0)
    steps_per_epoch = len(source)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    prec = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    print(f"training on {device} ({prec}{', channels_last' if channels_last else ''}): "
          f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size}", file=sys.stderr)
    if state.epoch >= cfg.epochs:
        print(f"{run.path} already has {state.epoch} epochs; pass a larger --epochs to extend it", file=sys.stderr)
        return state

    def save(*which: str) -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema:
            tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
        opt_t, opt_j = optimizer_to_flat(opt)
        rng_t, rng_j = rng_state()
        tensors.update(opt_t)
        tensors.update(rng_t)
        meta = dict(ckpt_meta, state=asdict(state), optimizer=opt_j, rng=rng_j, config=cfg.model_dump(mode="json"))
        save_checkpoint([run.checkpoint(w) for w in which], tensors, meta)

    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    run_start = time.perf_counter()
    epochs_at_start, elapsed_at_start = state.epoch, state.elapsed_s
    with _StopFlag() as stop:
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            frozen = epoch < freeze_epochs and head_names
            for name, p in model.named_parameters():
                p.requires_grad_(not frozen or any(name.startswith(h) for h in head_names))
            model.train()
            loss_sum = torch.tensor(state.loss_sum, dtype=acc_dtype, device=device)
            correct = torch.tensor(state.correct, dtype=torch.int64, device=device)
            seen = seen_at_start = state.seen
            t0 = time.perf_counter()
            bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", "step", initial=state.batch_in_epoch)
            lr = lr_at(max(0, state.step - 1), total_steps, cfg.lr, warmup, cfg.schedule)  # logged if no step runs
            for x, y in source.epoch(epoch, start=state.batch_in_epoch):
                lr = lr_at(state.step, total_steps, cfg.lr, warmup, cfg.schedule)
                for g in opt.param_groups:
                    g["lr"] = lr
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp_dtype):
                    logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=cfg.label_smoothing)
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema:
                    ema.update(model, state.step)
                state.step += 1
                state.batch_in_epoch += 1
                loss_sum += loss.detach().to(acc_dtype) * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if state.step % cfg.log_every == 0 or state.batch_in_epoch == steps_per_epoch:
                    running = loss_sum.item() / seen  # one sync per log interval, not per step
                    if not math.isfinite(running):
                        raise TrainingDiverged(
                            f"loss became {running} by step {state.step} (epoch {epoch + 1}, lr {lr:.3g}); "
                            f"stopped without saving, so {run.checkpoint('best')} is untouched. Try a lower --lr, "
                            "a --clip-grad value, or --precision fp32."
                        )
                    rate = (seen - seen_at_start) / max(1e-9, time.perf_counter() - t0)
                    bar.update(0, loss=f"{running:.4f}", acc=f"{correct.item() / seen:.3f}", ex_s=f"{rate:.0f}")
                bar.update(1)
                if stop.requested:
                    state.loss_sum, state.correct, state.seen = loss_sum.item(), int(correct.item()), seen
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
            train_loss, train_acc = loss_sum.item() / max(1, seen), correct.item() / max(1, seen)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"loss became {train_loss} in epoch {epoch + 1}; best checkpoint untouched")
            metrics = evaluate(ema.model if ema else model)
            state.elapsed_s = elapsed_at_start + time.perf_counter() - run_start
            state.epoch += 1
            state.batch_in_epoch, state.loss_sum, state.correct, state.seen = 0, 0.0, 0, 0
            row = {"epoch": state.epoch, "step": state.step, "lr": lr, "train_loss": train_loss,
                   "train_acc": train_acc, **metrics, "epoch_time_s": round(epoch_time, 3),
                   "elapsed_s": round(state.elapsed_s, 3),
                   "examples_per_s": round((seen - seen_at_start) / max(epoch_time, 1e-9), 1)}
            run.log_metrics(row)
            value = metrics[cfg.monitor]
            improved = _better(value, state.best, cfg.monitor)
            if improved:
                state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            else:
                state.bad_epochs += 1
            if cfg.early_stop and state.bad_epochs >= cfg.early_stop and state.epoch < cfg.epochs:
                state.stopped = "early_stop"
            save("last", *(["best"] if improved else []))  # one serialisation for both files
            done = state.epoch - epochs_at_start
            eta = (time.perf_counter() - run_start) / done * (cfg.epochs - state.epoch)
            extra = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"epoch {state.epoch}/{cfg.epochs}  train_loss {train_loss:.4f} train_acc {train_acc:.4f}  "
                  f"{extra}  {row['examples_per_s']:.0f} ex/s  {epoch_time:.1f}s"
                  f"{'  *best' if improved else ''}  ETA {_fmt_time(eta)}", file=sys.stderr)
            if state.stopped == "early_stop":
                print(f"early stop: {cfg.monitor} has not improved for {state.bad_epochs} epochs", file=sys.stderr)
                break
    run.close()
    return state


def _restore(path, model, opt, ema, device) -> TrainState:
    tensors, meta = load_checkpoint(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema:
        ema_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        ema.model.load_state_dict(ema_sd or model.state_dict())
    optimizer_from_flat(opt, tensors, meta["optimizer"], device)
    set_rng_state(tensors, meta["rng"])
    state = TrainState(**meta["state"])
    state.stopped = None
    return state
