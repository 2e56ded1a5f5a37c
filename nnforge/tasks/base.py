"""What a task is, and the training run every task shares.

    run = train_run("image", cfg)                 # seeds, run folder, config.yaml, meta.json, fit(), evaluation

A task provides:

    name: str                                      # "classify": recorded in meta.json, how a run finds its task
    configs: dict[str, type[EngineConfig]]         # `nnforge train <key>` -> its typed config
    build(cfg, run, device) -> Built               # data, named modules, optimizers, step, validation, run files
    evaluate(run, data=None, device="auto") -> dict   # eval/ and report.html; the headline metrics

and records in its checkpoints what loading the model needs (Built.trainable.meta): the registered model and its
arguments, the module to serve, and `io`, the model's inputs and outputs by kind (data/inputs.py, outputs.py).
That record is all `nnforge.load`, export and the server read: they never import a task.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from nnforge.config import EngineConfig, save_config
from nnforge.engine.device import resolve_device
from nnforge.engine.errors import TrainingInterrupted
from nnforge.engine.loop import Trainable, fit, monitor_mode
from nnforge.engine.run import Run, git_commit, versions
from nnforge.engine.seeding import seed_everything


@dataclass
class Built:
    trainable: Trainable
    meta: dict = field(default_factory=dict)  # the task's part of meta.json (classes, data fingerprint, ...)
    evaluate_after: bool = True  # whether evaluate(run) has held-out data to run on once training ends


class Task(Protocol):
    name: str
    configs: dict[str, type[EngineConfig]]

    def build(self, cfg: EngineConfig, run: Run, device: torch.device) -> Built: ...

    def evaluate(self, run: Run, data: str | None = None, device: str = "auto") -> dict: ...


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_run(target: str, cfg: EngineConfig, resume: str | None = None) -> Run:
    """Train the task behind `nnforge train <target>` with `cfg`; resume: a run folder to continue."""
    from nnforge.tasks import get_task, train_target

    task = get_task(train_target(target)[0])
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if resume:
        run = Run(resume)
        run.lock()
    else:
        run = Run.create(cfg.out, target, cfg.name)
    try:
        return _train(task, target, cfg, run, device, resume)
    except TrainingInterrupted:
        raise
    except BaseException:
        if run.created and not run.checkpoint("last").exists():
            shutil.rmtree(run.path, ignore_errors=True)  # nothing was trained: leave no empty run folder behind
        raise
    finally:
        run.unlock()


def _train(task, target: str, cfg: EngineConfig, run: Run, device: torch.device, resume: str | None) -> Run:
    from nnforge.evaluation.report import write_report

    log(f"run: {run.path}")
    built = task.build(cfg, run, device)
    built.trainable.meta.setdefault("task", task.name)  # checkpoints describe themselves
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in built.trainable.modules.items()}
    meta = {"task": task.name, "train": target, **built.meta, **built.trainable.meta, "seed": cfg.seed,
            "monitor": cfg.monitor, "monitor_mode": monitor_mode(cfg, built.trainable.directions),
            "parameters": sum(params.values()), "parameters_per_module": params,
            "git_commit": git_commit(Path(__file__).parent), "versions": versions(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "run": str(run.path)}
    save_config(cfg, run.path / "config.yaml")
    run.write_json("meta.json", meta)
    state = fit(built.trainable, cfg, run, device=device,
                resume_from=str(run.checkpoint("last")) if resume else None)
    if state.best is not None:
        log(f"best {cfg.monitor} {state.best:.4f} at epoch {state.best_epoch}; checkpoints in {run.checkpoints}")
    if built.evaluate_after:
        task.evaluate(run, device=cfg.device)
    else:
        log(f"report: {write_report(run.path)} (no test split: evaluate with --data to add test metrics)")
    return run
