"""A run is a folder: config.yaml, meta.json, metrics.csv, tb/, checkpoints/, eval/.

    run = Run.create("runs", "image", name=None)   # runs/image/exp1, exp2, ...
    run.log_metrics({"epoch": 1, "val_acc": 0.9})
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from nnforge.engine.checkpoint import atomic_write_bytes


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import numpy

    from nnforge import __version__

    return {
        "nnforge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


LOCK_FILE = ".lock"


class RunLocked(FileExistsError):
    """Another live process is writing to this run folder."""


class Run:
    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer  # False: a process of a distributed run other than rank 0, which writes nothing
        self._tb = None
        self._lock_fd: int | None = None
        self.created = False  # this process made the folder (a failed start may remove it again)
        self.trackers: list = []  # MLflow / W&B runs that also get every metrics row (engine/tracking.py)

    @classmethod
    def create(cls, out: str | Path, task: str, name: str | None = None) -> Run:
        """A new run folder, runs/<task>/<name> (exp1, exp2, ... when no name is given), locked for this process."""
        parent = Path(out) / task
        parent.mkdir(parents=True, exist_ok=True)
        created = True
        if name is None:
            while True:  # mkdir is atomic: two processes picking the next number cannot both get it
                taken = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"exp(\d+)", p.name))]
                path = parent / f"exp{max(taken, default=0) + 1}"
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
        else:
            path = parent / name
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.created = created
        run.lock()
        if run.checkpoints.exists():
            run.unlock()
            raise FileExistsError(f"{path} already holds a run; pick another --name or use --resume {path}")
        return run

    def lock(self) -> None:
        """Hold the folder for this process: an advisory lock on RUN/.lock that the kernel drops when the process
        ends, however it ends, so a crashed run never leaves it stuck. Temporary files a killed writer left are
        removed once the lock is ours."""
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): one writer per folder is then the user's to ensure
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{self.path} is being written by {holder}; wait for it to finish, or pick another "
                            "--name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {platform.node()}".encode())
        self._lock_fd = fd
        for stale in [*self.path.glob(".*.tmp"), *self.checkpoints.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    # --- files -------------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def checkpoint(self, which: str = "best") -> Path:
        return self.checkpoints / f"{which}.safetensors"

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        if not self.writer:
            return p
        atomic_write_bytes(p, json.dumps(obj, indent=2, default=str).encode())
        return p

    def read_json(self, name: str) -> Any:
        p = self.path / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; is {self.path} an nnforge run folder?")
        return json.loads(p.read_text())

    @property
    def meta(self) -> dict:
        return self.read_json("meta.json")

    # --- metrics -----------------------------------------------------------------------------------------
    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.csv (header from the first row) and the same scalars to TensorBoard."""
        if not self.writer:
            return
        self._append_csv(self.path / "metrics.csv", row)
        for tracker in self.trackers:
            tracker.metrics(row, step=int(row.get("epoch", row.get("step", 0))))
        tb = self._writer()
        if tb is not None:
            step = int(row.get("step", row.get("epoch", 0)))
            for k, v in row.items():
                # a NaN cell is a metric this row did not measure (an RL run's evaluation return): no point
                if isinstance(v, int | float) and k not in ("epoch", "step") and v == v:
                    tb.add_scalar(k, v, step)
            tb.flush()

    def read_metrics(self) -> list[dict[str, str]]:
        p = self.path / "metrics.csv"
        if not p.exists():
            return []
        with p.open() as f:
            return list(csv.DictReader(f))

    def truncate_metrics(self, epochs_done: int, column: str = "epoch") -> None:
        """On resume, drop rows for epochs (or another counter: an RL run's steps) the checkpoint does not cover
        (written after it, before a crash)."""
        rows = self.read_metrics()
        keep = [r for r in rows if int(float(r[column])) <= epochs_done]
        if len(keep) == len(rows):
            return
        p = self.path / "metrics.csv"
        p.unlink()
        for r in keep:
            self._append_csv(p, r)

    @staticmethod
    def _append_csv(p: Path, row: dict) -> None:
        new = not p.exists()
        with p.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _writer(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                self._tb = False
                return None
            self._tb = SummaryWriter(str(self.path / "tb"))
        return self._tb or None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        self._tb = None
