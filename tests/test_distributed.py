"""Data-parallel training on CPU: 2 gloo processes under torchrun train the run 1 process trains (same global batch),
only rank 0 writes, and a SIGTERM stops both at the same step with a checkpoint a resume continues from.

    .venv/bin/pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnforge.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# seed_cnn has no BatchNorm (whose statistics each process takes over its own rows), and fp32 without augmentation
# makes the single-process and the two-process runs the same arithmetic up to the order of the gradient sums.
ARGS = ["--model", "seed_cnn", "--epochs", "3", "--batch-size", "8", "--precision", "fp32", "--workers", "1",
        "--crop-pad", "0", "--no-flip", "--val-split", "0.2", "--test-split", "0.2", "--lr", "3e-3"]


def _losses(run: Path) -> list[dict]:
    return [{k: float(v) for k, v in r.items() if k in ("train_loss", "val_loss", "val_acc")}
            for r in csv.DictReader((run / "metrics.csv").open())]


def _train(png_tree, out, name, *extra, env=None, **popen):
    cmd = [sys.executable, "-m", "nnforge.cli", "train", "image", "--data", str(png_tree), "--out", str(out),
           "--name", name, *ARGS, *extra]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


@pytest.fixture(scope="module")
def two_process_run(png_tree, tmp_path_factory):
    """A 3-epoch run trained by 2 processes, and what its command printed: (run folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("dist")
    two = _train(png_tree, out, "two", "--nproc", "2")
    stdout, stderr = two.communicate(timeout=600)
    assert two.returncode == 0, stderr[-3000:]
    return out / "image" / "two", stdout, stderr


def test_two_processes_train_what_one_trains(png_tree, tmp_path, two_process_run):
    one = _train(png_tree, tmp_path, "one")
    out1, err1 = one.communicate(timeout=600)
    assert one.returncode == 0, err1[-3000:]
    two_run, out2, err2 = two_process_run
    assert "2 processes" in err2 and out2.strip().splitlines()[-1].endswith("image/two")  # said once, by rank 0
    a, b = _losses(tmp_path / "image" / "one"), _losses(two_run)
    assert len(a) == len(b) == 3  # rank 0 alone wrote metrics.csv: one row per epoch
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-4), (k, ra, rb)
    wa = load_checkpoint(tmp_path / "image" / "one" / "checkpoints" / "last.safetensors")[0]
    wb = load_checkpoint(two_run / "checkpoints" / "last.safetensors")[0]
    for k in wa:
        if k.startswith("model."):
            torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-4)
    assert (two_run / "eval" / "report.json").is_file()  # rank 0 evaluated


def test_a_sigterm_stops_both_processes_and_the_run_resumes(png_tree, tmp_path):
    # a long run, stopped as soon as its first epoch is written; torchrun passes SIGTERM on to both processes
    proc = _train(png_tree, tmp_path, "stopped", "--nproc", "2", "--epochs", "400", start_new_session=True)
    metrics = tmp_path / "image" / "stopped" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "saving a checkpoint" in err
    state = load_checkpoint(tmp_path / "image" / "stopped" / "checkpoints" / "last.safetensors")[1]["state"]
    assert state["stopped"] == "interrupted" and state["epoch"] >= 1
    resumed = subprocess.run([sys.executable, "-m", "nnforge.cli", "train", "image", "--resume",
                              str(tmp_path / "image" / "stopped"), "--epochs", str(state["epoch"] + 1), "--nproc",
                              "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, "\n".join(  # each rank's error line first: torchrun's traceback buries them
        [line for line in resumed.stderr.splitlines() if "error" in line.lower()][:20] + [resumed.stderr[-2000:]])
    rows = list(csv.DictReader(metrics.open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, state["epoch"] + 2))


@pytest.mark.parametrize("stop_at", [(1, 0), (1, -1)], ids=["mid-epoch", "after-the-epochs-last-batch"])
def test_a_stopped_two_process_run_resumes_the_same_curve(png_tree, tmp_path, two_process_run, stop_at):
    # a stop after an epoch's last batch leaves nothing of that epoch to train: the resume must still validate it,
    # and every process must sum the same metrics (rank 1 once summed none there, and the resume aborted or hung)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "distributed_stop.py"), "train", "image", "--data", str(png_tree), "--out",
           str(tmp_path), "--name", "stopped", *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STOP_EPOCH": str(stop_at[0]), "STOP_BATCH": str(stop_at[1])}
    stopped = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert stopped.returncode != 0 and "saving a checkpoint" in stopped.stderr, stopped.stderr[-3000:]
    run = tmp_path / "image" / "stopped"
    state = load_checkpoint(run / "checkpoints" / "last.safetensors")[1]["state"]
    assert (state["stopped"], state["epoch"]) == ("interrupted", 1)
    resumed = subprocess.run([sys.executable, "-m", "nnforge.cli", "train", "image", "--resume", str(run), "--nproc",
                              "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, again = _losses(two_process_run[0]), _losses(run)
    assert len(again) == len(straight) == 3
    for ra, rb in zip(straight, again, strict=True):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-6), (k, ra, rb)
