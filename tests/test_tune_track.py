"""Hyper-parameter search (Optuna on a real SQLite file, two worker processes) and experiment tracking (a real MLflow
store: the SQLite file and artifact folder MLflow 3 uses locally; Weights & Biases in offline mode).

    .venv/bin/pytest tests/test_tune_track.py -q
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nnforge

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--epochs", "2", "--batch-size", "8", "--workers", "1", "--precision", "fp32", "--val-split", "0.2",
          "--test-split", "0.2"]


def test_two_workers_share_one_study_and_leave_a_config_train_takes(png_tree, tmp_path):
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                                     "model_args.width": {"type": "categorical", "choices": [8, 16]}}))
    db = f"sqlite:///{tmp_path / 'study.db'}"
    cmd = [sys.executable, "-m", "nnforge.cli", "tune", "image", "--data", str(png_tree), "--space", str(space),
           "--trials", "4", "--storage", db, "--study", "shapes", "--out", str(tmp_path / "runs"), *COMMON]
    workers = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shapes", storage=db)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))  # no trial number twice, whichever worker ran it
    assert 4 <= len(finished) <= 5  # the budget is the study's (a worker may start one as the other finishes)
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            run = Path(t.user_attrs["run"])
            assert (run / "checkpoints" / "best.safetensors").is_file() and run.name == f"shapes-t{t.number}"
    summary = json.loads(outs[0][0])
    best = yaml.safe_load(Path(summary["best_config"]).read_text())
    assert best["lr"] == pytest.approx(study.best_trial.params["lr"])
    assert best["model_args"]["width"] == study.best_trial.params["model_args.width"]
    assert "Optimisation history" in Path(summary["report"]).read_text()
    # the best config trains as it is
    run = nnforge.train("image", config=summary["best_config"], out=str(tmp_path / "again"), epochs=1)
    assert run.meta["model_kwargs"]["width"] == best["model_args"]["width"]


def test_a_bad_space_names_the_key():
    import tempfile

    from nnforge.config import ConfigError, ImageTrainConfig
    from nnforge.tune import read_space

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}, f)
    with pytest.raises(ConfigError, match="'learning_rate' is not a config key.*allowed: .*lr"):
        read_space(f.name, ImageTrainConfig)
    os.unlink(f.name)


def test_mlflow_store_holds_what_metrics_csv_holds_and_wandb_runs_offline(png_tree, tmp_path):
    from mlflow.tracking import MlflowClient

    run = nnforge.train("image", data=str(png_tree), epochs=2, batch_size=8, workers=1, precision="fp32",
                        val_split=0.2, test_split=0.2, out=str(tmp_path / "runs"), name="tracked",
                        track="mlflow,wandb")
    tracking = {t["kind"]: t for t in run.meta["tracking"]}
    client = MlflowClient(tracking_uri=tracking["mlflow"]["uri"])
    rows = list(csv.DictReader((run.path / "metrics.csv").open()))
    for key in ("train_loss", "val_acc", "val_loss"):
        history = sorted(client.get_metric_history(tracking["mlflow"]["run_id"], key), key=lambda m: m.step)
        assert [m.step for m in history] == [int(r["epoch"]) for r in rows]
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows])
    params = client.get_run(tracking["mlflow"]["run_id"]).data.params
    assert params["lr"] == str(run.meta and yaml.safe_load((run.path / "config.yaml").read_text())["lr"])
    artifacts = {a.path for a in client.list_artifacts(tracking["mlflow"]["run_id"])}
    assert {"report.html", "best.safetensors", "metrics.csv"} <= artifacts
    nnforge.export(run.path)  # the export joins the same tracked run
    assert "model.onnx" in {a.path for a in client.list_artifacts(tracking["mlflow"]["run_id"])}
    # W&B: offline, into the run folder, nothing sent anywhere
    assert tracking["wandb"]["mode"] == "offline"
    offline = list((run.path / "wandb").glob("offline-run-*"))
    assert offline and any(p.name.endswith(".wandb") for d in offline for p in d.iterdir())


def test_asking_for_a_tracker_that_is_not_installed_says_how(png_tree, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):  # as on a machine without the package
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match=r"pip install 'nnforge\[track\]'"):
        nnforge.train("image", data=str(png_tree), epochs=1, batch_size=8, workers=1, out=str(tmp_path),
                      track="wandb")
    assert not (tmp_path / "image" / "exp1").exists()  # refused before anything was trained or left behind
