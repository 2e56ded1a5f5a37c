"""What a task is, and the training run every task shares.

    run = train_run("image", cfg)                 # seeds, run folder, config.yaml, meta.json, fit(), evaluation

A task provides:

    name: str                                      # "classify": recorded in meta.json, how a run finds its task
    configs: dict[str, type[EngineConfig]]         # `nnforge train <key>` -> its typed config
    build(cfg, run, device) -> Built               # data, named modules, optimizers, step, validation, run files
                                                   # (or, where the algorithm is its own loop (rl), a train callable)
    evaluate(run, data=None, device="auto") -> dict   # eval/ and report.html; the headline metrics

and records in its checkpoints what loading the model needs (Built.trainable.meta): the registered model and its
arguments, the module to serve, and `io`, the model's inputs and outputs by kind (data/inputs.py, outputs.py).
That record is all `nnforge.load`, export and the server read: they never import a task.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from nnforge.config import EngineConfig, save_config
from nnforge.engine import distributed
from nnforge.engine.device import resolve_device
from nnforge.engine.errors import TrainingDiverged, TrainingInterrupted
from nnforge.engine.loop import Trainable, fit, monitor_mode
from nnforge.engine.run import Run, git_commit, versions
from nnforge.engine.seeding import seed_everything
from nnforge.engine.tracking import open_trackers


@dataclass
class Built:
    trainable: Trainable | None  # what fit() trains; None where the algorithm is its own loop (train below)
    meta: dict = field(default_factory=dict)  # the task's part of meta.json (classes, data fingerprint, ...)
    evaluate_after: bool = True  # whether evaluate(run) has held-out data to run on once training ends
    # An algorithm that is its own loop (RL): train(resume) runs it in the run, using the engine's pieces
    # (checkpoint_tensors/save_checkpoint, StopFlag, Progress, Run.log_metrics); meta then holds its model record.
    train: Callable[[bool], None] | None = None


class Task(Protocol):
    name: str
    configs: dict[str, type[EngineConfig]]

    def build(self, cfg: EngineConfig, run: Run, device: torch.device) -> Built: ...

    def evaluate(self, run: Run, data: str | None = None, device: str = "auto") -> dict: ...


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_run(target: str, cfg: EngineConfig, resume: str | None = None,
              on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train the task behind `nnforge train <target>` with `cfg`; resume: a run folder to continue; on_epoch: called
    with every epoch's metrics row (the engine's fit; see engine/loop.py)."""
    from nnforge.tasks import get_task, train_target

    task = get_task(train_target(target)[0])
    world = distributed.setup(cfg.device)
    try:
        return _train_in(world, task, target, cfg, resume, on_epoch)
    finally:
        distributed.teardown()  # every process leaves the group together, whatever happened


def _train_in(world, task, target: str, cfg: EngineConfig, resume: str | None,
              on_epoch: Callable[[dict], None] | None) -> Run:
    """train_run once this process knows its place among the training processes."""
    if world.distributed and (task.name != "classify" or getattr(cfg, "model", None) == "auto"):
        raise ValueError("training on several processes is supported for classification runs with a chosen model "
                         f"(not {task.name}, not --model auto)")
    seed_everything(cfg.seed)
    device = resolve_device(distributed.device_for(world, cfg.device))
    if not world.main:  # rank 0 owns the run folder; the others train alongside and write nothing
        return _follow(task, target, cfg, Run(world.broadcast(None), writer=False), device, resume, world)
    if resume:
        run = Run(resume)
        run.lock()
    else:
        run = Run.create(cfg.out, target, cfg.name)
    world.broadcast(str(run.path))
    try:
        _train(task, target, cfg, run, device, resume, on_epoch)
        _finish_tracking(run, ok=True)
        _record_outcome(run, "finished")
        return run
    except TrainingInterrupted:
        _finish_tracking(run, ok=True)
        _record_outcome(run, "interrupted")
        raise
    except BaseException as err:
        _finish_tracking(run, ok=False)
        _record_outcome(run, "diverged" if isinstance(err, TrainingDiverged) else "failed", str(err))
        if run.created and not run.checkpoint("last").exists():
            shutil.rmtree(run.path, ignore_errors=True)  # nothing was trained: leave no empty run folder behind
        raise
    finally:
        run.unlock()


def _record_outcome(run: Run, outcome: str, detail: str = "") -> None:
    """meta.json's "outcome": finished, interrupted, diverged or failed, so that nothing downstream (the
    continuous-learning gate) can take a half-trained or NaN run for a finished one."""
    try:
        meta = run.read_json("meta.json")
    except (FileNotFoundError, ValueError):
        return
    meta["outcome"] = outcome
    if detail:
        meta["outcome_detail"] = detail[:500]
    run.write_json("meta.json", meta)


def _follow(task, target: str, cfg: EngineConfig, run: Run, device: torch.device, resume: str | None,
            world) -> Run:
    """A process of a distributed run other than rank 0: the same data, model and steps; rank 0 writes."""
    world.barrier()  # rank 0 has read and checked the data first (caches filled once, errors said once)
    built = task.build(cfg, run, device)
    fit(built.trainable, cfg, run, device=device, resume_from=str(run.checkpoint("last")) if resume else None)
    return run


def _start(run: Run, cfg: EngineConfig, target: str, meta: dict, resume: str | None) -> None:
    """config.yaml and meta.json, and the experiment trackers (--track), which get the config as parameters."""
    previous = None
    if resume and (run.path / "meta.json").is_file():
        previous = run.read_json("meta.json").get("tracking")
    run.trackers = open_trackers(cfg.track, run.path, target, previous)
    meta["tracking"] = [t.describe() for t in run.trackers]
    save_config(cfg, run.path / "config.yaml")
    run.write_json("meta.json", meta)
    for t in run.trackers:
        t.params(cfg.model_dump(mode="json"))


def _finish_tracking(run: Run, ok: bool) -> None:
    """The run's files a tracker keeps (report, best checkpoint, metrics), then its run is closed."""
    files = [p for p in (run.path / "report.html", run.checkpoint("best"), run.path / "metrics.csv") if p.is_file()]
    for t in run.trackers:
        try:
            t.artifacts(files)
            t.close(ok)
        except Exception as err:  # noqa: BLE001 - a tracker's failure must not turn a finished run into a failed one
            log(f"WARNING: {t.describe()['kind']} could not take the run's files: {err}")
    run.trackers = []


def _train(task, target: str, cfg: EngineConfig, run: Run, device: torch.device, resume: str | None,
           on_epoch: Callable[[dict], None] | None = None) -> Run:
    from nnforge.evaluation.report import write_report

    log(f"run: {run.path}")
    built = task.build(cfg, run, device)
    distributed.world().barrier()  # the other processes build once the data is checked and cached
    if (built.trainable is None) == (built.train is None):
        raise TypeError(f"task {task.name}: build() must return a Trainable or a train callable, not both or neither")
    if built.train is not None:
        return _train_own_loop(task, target, cfg, run, built, resume)
    built.trainable.meta.setdefault("task", task.name)  # checkpoints describe themselves
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in built.trainable.modules.items()}
    meta = {"task": task.name, "train": target, **built.meta, **built.trainable.meta, "seed": cfg.seed,
            "monitor": cfg.monitor, "monitor_mode": monitor_mode(cfg, built.trainable.directions),
            "parameters": sum(params.values()), "parameters_per_module": params,
            "git_commit": git_commit(Path(__file__).parent), "versions": versions(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "run": str(run.path)}
    _start(run, cfg, target, meta, resume)
    state = fit(built.trainable, cfg, run, device=device,
                resume_from=str(run.checkpoint("last")) if resume else None, on_epoch=on_epoch)
    if state.best is not None:
        log(f"best {cfg.monitor} {state.best:.4f} at epoch {state.best_epoch}; checkpoints in {run.checkpoints}")
    if built.evaluate_after:
        task.evaluate(run, device=cfg.device)
    else:
        log(f"report: {write_report(run.path)} (no test split: evaluate with --data to add test metrics)")
    return run


def _train_own_loop(task, target: str, cfg: EngineConfig, run: Run, built: Built, resume: str | None) -> Run:
    """The same run folder for an algorithm that is its own loop: config.yaml, meta.json, then its train()."""
    meta = {"task": task.name, "train": target, **built.meta, "seed": cfg.seed, "monitor": cfg.monitor,
            "git_commit": git_commit(Path(__file__).parent), "versions": versions(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "run": str(run.path)}
    _start(run, cfg, target, meta, resume)
    built.train(resume is not None)
    if built.evaluate_after:
        task.evaluate(run, device=cfg.device)
    return run
