"""Experiment trackers beside metrics.csv and TensorBoard: MLflow and Weights & Biases, when asked for.

    nnforge train image --data DIR --track mlflow                # RUNS_PARENT/mlflow.db + RUNS_PARENT/mlartifacts
    nnforge train image --data DIR --track mlflow:http://mlflow.internal:5000
    nnforge train image --data DIR --track wandb                 # offline (RUN/wandb) unless wandb:online

A run sends its config as parameters at the start, every metrics row as it is written, and its artifacts
(report.html, the best checkpoint, metrics.csv; model.onnx when `nnforge export` runs later) at the end. MLflow's
local store is a SQLite file beside the runs (what MLflow 3 recommends; its ./mlruns folder store is frozen), or
any tracking URI after "mlflow:". Neither
package is a dependency of nnforge: asking for one that is not installed says how to install it. Weights & Biases
runs offline unless told `wandb:online`, so a machine with no network never waits on it; `wandb sync RUN/wandb`
uploads later. The tracker's run id is kept in meta.json ("tracking"), so export adds its file to the same run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class TrackerMissing(RuntimeError):
    """A tracker was asked for whose package is not installed."""


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # MLflow caps a parameter value's length
    return out


class MLflowTracker:
    def __init__(self, uri: str | None, experiment: str, name: str, folder: Path, run_id: str | None = None):
        try:
            import mlflow
        except ImportError:
            raise TrackerMissing("--track mlflow needs MLflow: pip install 'nnforge[track]' (or pip install "
                                 "mlflow)") from None
        self.mlflow = mlflow
        folder = folder.resolve()
        self.client = mlflow.MlflowClient(tracking_uri=uri or f"sqlite:///{folder / 'mlflow.db'}")
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=None if uri else (folder / "mlartifacts" / experiment).as_uri())
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.run_id = run_id

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = _flat(params)
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def metrics(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for k, v in row.items() if isinstance(v, int | float)
                  and not isinstance(v, bool) and k not in ("epoch", "step")]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def artifacts(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def describe(self) -> dict:
        return {"kind": "mlflow", "uri": self.client.tracking_uri, "run_id": self.run_id}


class WandbTracker:
    def __init__(self, mode: str, project: str, name: str, folder: Path, run_id: str | None = None):
        try:
            import wandb
        except ImportError:
            raise TrackerMissing("--track wandb needs Weights & Biases: pip install 'nnforge[track]' (or pip "
                                 "install wandb)") from None
        self.wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=name, dir=str(folder), mode=mode, id=run_id,
                              resume="allow" if run_id else None, reinit="create_new")
        self.run_id = self.run.id
        self.mode = mode

    def params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, row: dict, step: int) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)},
                     step=step)

    def artifacts(self, paths: list[Path]) -> None:
        for p in paths:
            self.run.save(str(p), base_path=str(p.parent), policy="now")

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def describe(self) -> dict:
        return {"kind": "wandb", "mode": self.mode, "run_id": self.run_id, "dir": str(self.run.dir)}


KINDS = ("mlflow", "wandb")


def open_trackers(spec: str | None, run_path: Path, experiment: str, previous: list[dict] | None = None) -> list:
    """Trackers for --track SPEC ("mlflow", "mlflow:URI", "wandb", "wandb:online", several with commas); previous:
    meta.json's "tracking" of a resumed or exported run, to continue the same tracker runs."""
    out = []
    by_kind = {p["kind"]: p for p in previous or []}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        kind, _, arg = part.partition(":")
        if kind not in KINDS:
            raise ValueError(f"--track {part!r}: expected mlflow, mlflow:URI, wandb or wandb:online")
        old = by_kind.get(kind, {})
        if kind == "mlflow":
            out.append(MLflowTracker(arg or old.get("uri"), experiment, run_path.name, run_path.parent.parent,
                                     old.get("run_id")))
        else:
            mode = arg or old.get("mode") or "offline"
            if mode not in ("offline", "online"):
                raise ValueError(f"--track {part!r}: expected wandb:online or wandb:offline")
            out.append(WandbTracker(mode, "nnforge", run_path.name, run_path, old.get("run_id")))
    return out


def reopen(meta: dict, run_path: Path) -> list:
    """The trackers a finished run was tracked with (meta.json "tracking"), to add files to the same runs."""
    previous = meta.get("tracking") or []
    spec = ",".join(p["kind"] for p in previous)
    return open_trackers(spec, run_path, meta.get("train", meta.get("task", "nnforge")), previous) if spec else []
