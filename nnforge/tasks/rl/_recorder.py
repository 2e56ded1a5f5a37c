"""What PPO and DQN share around their loops: the run's checkpoints, metrics rows, evaluations, progress and stops.

    rec = Recorder(cfg, run, device, modules={"policy": net}, optimizers={"policy": opt}, record=record,
                   columns=["pg_loss", ...], act=deterministic_actions)
    if resume: rec.restore()
    with rec.running() as stop:
        ...                                   # the algorithm's own loop; rec.env_time += seconds in envs.step
        rec.finished_episodes(returns, lengths)
        rec.after_update(steps, {"pg_loss": ...})   # logs, evaluates, checkpoints when due; True: stop now
        if stop.requested: rec.interrupt()          # a checkpoint as of the last update, then TrainingInterrupted

Checkpoints are the engine's (checkpoint_tensors: named modules, optimizers, RNG; save_checkpoint: atomic, one
safetensors file) with the loop's JSON state (step counter, clocks, best evaluation, reward statistics) and the
model record nnforge.load reads. `best` is the checkpoint with the highest evaluation return so far.

Exact resume covers networks, optimizers, the schedules (functions of the step) and the step counter; the
environments restart from fresh seeds (their internal state is not saved) and DQN's replay buffer refills.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from nnforge.config import RLConfig
from nnforge.engine.checkpoint import save_checkpoint
from nnforge.engine.errors import TrainingDiverged, TrainingInterrupted
from nnforge.engine.loop import StopFlag, checkpoint_tensors, restore_checkpoint
from nnforge.engine.progress import Progress
from nnforge.engine.run import Run
from nnforge.tasks.rl.envs import run_episodes

EVAL_SEED = 10_000  # evaluation episodes reset from seed + EVAL_SEED + i: the same episodes at every evaluation
COMMON = ["step", "time_s", "lr", "episodes", "episode_return", "episode_length", "eval_return", "eval_return_std",
          "eval_length", "sps", "env_sps"]


@dataclass
class LoopState:
    """The loop's JSON state, saved in every checkpoint."""

    step: int = 0             # environment steps taken, over all environments
    updates: int = 0          # PPO iterations / DQN gradient steps
    time_s: float = 0.0       # wall time in the loop, evaluations excluded, across resumes
    env_time_s: float = 0.0   # of which inside envs.step
    episodes: int = 0
    best: float | None = None  # best evaluation return, and its step
    best_step: int | None = None
    last_eval: int = 0        # step of the last evaluation, row and checkpoint
    last_row: int = 0
    last_save: int = 0
    resumes: int = 0
    reward_stats: dict = field(default_factory=dict)  # PPO's reward normalisation (mean, var, count)


class RunningMeanStd:
    """Running mean and variance of a stream of batches (numpy), for reward scaling."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 1e-4):
        self.mean, self.var, self.count = mean, var, count

    def update(self, x: np.ndarray) -> None:
        b_mean, b_var, n = float(x.mean()), float(x.var()), x.size
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_var * n + delta**2 * self.count * n / total) / total
        self.count = total


class Recorder:
    def __init__(self, cfg: RLConfig, run: Run, device: torch.device, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], record: dict, columns: list[str], act):
        self.cfg, self.run, self.device = cfg, run, device
        self.modules, self.optimizers, self.record = modules, optimizers, record
        self.columns, self.act = COMMON + columns, act
        self.state = LoopState()
        self.env_time = 0.0  # seconds inside envs.step since the last row (the loop adds to it)
        self.recent: deque[tuple[float, int]] = deque(maxlen=100)  # (return, length) of the last episodes
        self._since_row: list[tuple[float, int]] = []
        self._sums: dict[str, float] = {}  # per metric: sum and count since the last row
        self._counts: dict[str, int] = {}
        self._row_t = self._row_step = self._row_env = None
        self.progress: Progress | None = None

    # --- checkpoints ---------------------------------------------------------------------------------------
    def save(self, *which: str) -> None:
        tensors, extra = checkpoint_tensors(self.modules, self.optimizers)
        meta = dict(self.record, config=self.cfg.model_dump(mode="json"), task_state=asdict(self.state), **extra)
        save_checkpoint([self.run.checkpoint(w) for w in which], tensors, meta)

    def restore(self) -> None:
        meta = restore_checkpoint(self.run.checkpoint("last"), self.modules, self.optimizers, self.device)
        self.state = LoopState(**meta["task_state"])
        self.state.resumes += 1
        self.run.truncate_metrics(self.state.step, column="step")  # rows written after the checkpoint would repeat
        log(f"resumed at step {self.state.step} of {self.cfg.steps}; the environments restart from fresh seeds")

    @property
    def env_seed(self) -> int:
        """Reset seed of the training environments: the config's, then a fresh one after each resume."""
        return self.cfg.seed + 7919 * self.state.resumes

    # --- the loop around the algorithm -----------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self):
        self.progress = Progress(self.cfg.steps, f"{self.cfg.algo} {self.cfg.env}", "step", initial=self.state.step)
        self._start_clock()
        try:
            with StopFlag() as stop:
                yield stop
        finally:
            self.progress.close()
            self.run.close()

    def _start_clock(self) -> None:
        self._t = time.perf_counter()
        self._row_t, self._row_step, self._row_env = self.state.time_s, self.state.step, self.state.env_time_s

    def _tick(self) -> None:
        """Move the clocks forward to now (evaluation time is taken out by restarting _t afterwards)."""
        now = time.perf_counter()
        self.state.time_s += now - self._t
        self.state.env_time_s += self.env_time
        self.env_time, self._t = 0.0, now

    def finished_episodes(self, returns, lengths) -> None:
        for r, n in zip(returns, lengths, strict=True):
            self.recent.append((float(r), int(n)))
            self._since_row.append((float(r), int(n)))
            self.state.episodes += 1

    def after_update(self, steps: int, metrics: dict[str, float]) -> bool:
        """Count `steps` new environment steps and one update's metrics; log a row, evaluate and checkpoint when
        due. Returns True when the run should stop (the target return was reached)."""
        for k, v in metrics.items():
            if not math.isfinite(v):
                raise TrainingDiverged(f"{k} became {v} at step {self.state.step + steps}; stopped without saving, "
                                       f"so {self.run.checkpoint('best')} is untouched. Try a lower --lr.")
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1
        self.state.step += steps
        s, cfg = self.state, self.cfg
        self._tick()
        self.progress.update(steps, **({"return": f"{np.mean([r for r, _ in self.recent]):.1f}"}
                                       if self.recent else {}))
        out_of_time = cfg.max_time_s is not None and s.time_s >= cfg.max_time_s
        if out_of_time:
            log(f"max_time_s {cfg.max_time_s:g} reached at step {s.step}")
        done = s.step >= cfg.steps or out_of_time
        evaluate = done or (cfg.eval_every and s.step - s.last_eval >= cfg.eval_every)
        stop = out_of_time
        if evaluate or s.step - s.last_row >= cfg.log_every:
            stop = self._row(evaluate) or stop
        if done or stop or s.step - s.last_save >= cfg.checkpoint_every or evaluate:
            self._tick()
            improved = evaluate and s.best_step == s.step
            self.save("last", *(["best"] if improved else []))
            s.last_save = s.step
        return stop

    def _row(self, evaluate: bool) -> bool:
        s, cfg = self.state, self.cfg
        dt = max(s.time_s - self._row_t, 1e-9)
        env_dt = max(s.env_time_s - self._row_env, 1e-9)
        lr = self.optimizers[next(iter(self.optimizers))].param_groups[0]["lr"]
        eps = self._since_row
        row = {"step": s.step, "time_s": round(s.time_s, 3), "lr": lr, "episodes": s.episodes,
               "episode_return": np.mean([r for r, _ in eps]) if eps else math.nan,
               "episode_length": np.mean([n for _, n in eps]) if eps else math.nan,
               "eval_return": math.nan, "eval_return_std": math.nan, "eval_length": math.nan,
               "sps": round((s.step - self._row_step) / dt, 1), "env_sps": round((s.step - self._row_step) / env_dt, 1)}
        row.update({k: v / self._counts[k] for k, v in self._sums.items()})
        stop = False
        if evaluate:
            results = self.evaluate(cfg.eval_episodes)
            returns = [e["return"] for e in results]
            row.update(eval_return=float(np.mean(returns)), eval_return_std=float(np.std(returns)),
                       eval_length=float(np.mean([e["length"] for e in results])))
            s.last_eval = s.step
            if s.best is None or row["eval_return"] > s.best:
                s.best, s.best_step = row["eval_return"], s.step
            log(f"step {s.step}: eval return {row['eval_return']:.1f} ± {row['eval_return_std']:.1f} over "
                f"{len(returns)} episodes (best {s.best:.1f}); {row['sps']:.0f} steps/s, environments alone "
                f"{row['env_sps']:.0f}/s")
            stop = cfg.target_return is not None and row["eval_return"] >= cfg.target_return
            if stop:
                log(f"target return {cfg.target_return} reached at step {s.step} ({s.time_s:.1f} s of training)")
        self.run.log_metrics({k: row.get(k, math.nan) for k in self.columns})
        s.last_row = s.step
        self._since_row, self._sums, self._counts = [], {}, {}
        self._row_t, self._row_step, self._row_env = s.time_s, s.step, s.env_time_s
        self._t = time.perf_counter()  # the evaluation's time is not training time
        return stop

    @torch.no_grad()
    def evaluate(self, episodes: int) -> list[dict]:
        for m in self.modules.values():
            m.eval()
        try:
            return run_episodes(self.act, self.cfg, episodes, self.cfg.seed + EVAL_SEED)
        finally:
            for m in self.modules.values():
                m.train()

    def interrupt(self) -> None:
        """Ctrl-C / SIGTERM: save `last` as of the last completed update, then stop."""
        self._tick()
        self.save("last")
        raise TrainingInterrupted(f"stopped at step {self.state.step}; continue with: nnforge train rl --resume "
                                  f"{self.run.path}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
