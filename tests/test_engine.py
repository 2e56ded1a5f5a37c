"""The training engine's promises: exact resume, repeatable seeds, crash-safe checkpoints, no pickles, NaN stops."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from stopping import stopping_source

import nnforge
from nnforge.data.images import ImageData
from nnforge.engine.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file, save_checkpoint
from nnforge.engine.loop import TrainingInterrupted, _better
from nnforge.engine.schedule import lr_at

TIME_COLUMNS = {"epoch_time_s", "elapsed_s", "examples_per_s"}
COMMON = dict(epochs=3, batch_size=8, workers=1, val_split=0.2, test_split=0.2, ema=0.9)


def _tensors(run_path, which="last"):
    return load_checkpoint(run_path / "checkpoints" / f"{which}.safetensors")[0]


def _metrics(run_path):
    rows = list(csv.DictReader((run_path / "metrics.csv").open()))
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]


def _assert_same_state(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if not k.startswith("rng."):
            assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("stop_at", [(1, 2), (2, 0)], ids=["mid-epoch", "epoch-boundary"])
def test_resume_after_sigterm_is_bit_identical(png_tree, tmp_path, monkeypatch, stop_at):
    """SIGTERM lands during training; resuming gives the same weights, optimizer state and metrics."""
    reference = nnforge.train("image", data=str(png_tree), out=str(tmp_path), name="straight", **COMMON).path

    original = ImageData.train_source
    monkeypatch.setattr(ImageData, "train_source", stopping_source(original, stop_at))  # a real SIGTERM
    with pytest.raises(TrainingInterrupted):
        nnforge.train("image", data=str(png_tree), out=str(tmp_path), name="interrupted", **COMMON)
    monkeypatch.setattr(ImageData, "train_source", original)
    run = tmp_path / "image" / "interrupted"
    state = load_checkpoint(run / "checkpoints" / "last.safetensors")[1]["state"]
    assert state["stopped"] == "interrupted" and state["epoch"] == stop_at[0]
    nnforge.train("image", resume=str(run))
    _assert_same_state(reference, run)
    assert _metrics(reference) == _metrics(run)


def test_finished_run_can_be_extended(trained_run, tmp_path):
    import shutil

    run = tmp_path / "extend"
    shutil.copytree(trained_run, run)
    nnforge.train("image", resume=str(run), epochs=4)
    assert [int(r["epoch"]) for r in _metrics(run)] == [1, 2, 3, 4]


def test_same_seed_repeats_and_other_seed_differs(png_tree, tmp_path):
    kw = dict(COMMON, epochs=1, ema=None)
    a = nnforge.train("image", data=str(png_tree), out=str(tmp_path), name="a", seed=7, **kw).path
    b = nnforge.train("image", data=str(png_tree), out=str(tmp_path), name="b", seed=7, **kw).path
    c = nnforge.train("image", data=str(png_tree), out=str(tmp_path), name="c", seed=8, **kw).path
    _assert_same_state(a, b)
    assert _metrics(a) == _metrics(b)
    wa, wc = _tensors(a), _tensors(c)
    assert not torch.equal(wa["model.head.weight"], wc["model.head.weight"])


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ck" / "last.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"epoch": 1})
    # A child process writes a big checkpoint over it and is SIGKILLed while the data is being flushed.
    child = textwrap.dedent(f"""
        import os, sys, time, torch
        from nnforge.engine import checkpoint
        real_fsync = os.fsync
        def slow_fsync(fd):
            print("writing", flush=True)
            time.sleep(30)
        checkpoint.os.fsync = slow_fsync
        checkpoint.save_checkpoint({str(path)!r}, {{"w": torch.zeros(2_000_000)}}, {{"epoch": 2}})
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait(10)
    tensors, meta = load_checkpoint(path)
    assert meta == {"epoch": 1} and torch.equal(tensors["w"], torch.ones(3))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_pickle_payloads_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    evil_ckpt = tmp_path / "best.safetensors"
    evil_ckpt.write_bytes(pickle.dumps({"model.w": _Evil()}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(evil_ckpt)
    torch_saved = tmp_path / "torch.safetensors"
    torch.save({"w": torch.ones(2), "x": _Evil()}, torch_saved)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(torch_saved)
    evil_pth = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(2), "x": _Evil()}, evil_pth)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict_file(evil_pth)
    assert not marker.exists()


def test_nan_loss_stops_without_touching_best(trained_run, tmp_path):
    import shutil

    run = tmp_path / "nan"
    shutil.copytree(trained_run, run)
    best = (run / "checkpoints" / "best.safetensors").read_bytes()
    p = subprocess.run([sys.executable, "-m", "nnforge.cli", "train", "image", "--resume", str(run), "--epochs", "5",
                        "--lr", "1e30", "--clip-grad", "1e38"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "loss became" in p.stderr
    assert (run / "checkpoints" / "best.safetensors").read_bytes() == best


def test_lr_schedules_are_plain_functions_of_the_step():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, "onecycle") == pytest.approx(0.0)
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(70, 100, 1.0, 10, "constant") == 1.0


def test_a_tie_of_the_monitored_metric_goes_to_the_lower_validation_loss():
    assert _better(0.92, None, "max")  # the first epoch is always the best so far
    assert _better(0.93, 0.92, "max", loss=0.9, best_loss=0.1)  # strictly better wins whatever the loss
    assert _better(0.92, 0.92, "max", loss=0.15, best_loss=0.30)  # same accuracy, the model learnt: keep it
    assert not _better(0.92, 0.92, "max", loss=0.31, best_loss=0.30)
    assert not _better(0.92, 0.92, "max")  # no loss logged: a tie is not an improvement
    assert _better(0.2, 0.3, "min") and not _better(0.3, 0.3, "min")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-tensor"])
def test_optimizer_resumes_channels_last_weights_exactly(tmp_path, fused):
    """A checkpoint file holds contiguous moments; a channels-last weight must get its own back, not its neighbours'
    (the fused kernel walks the parameter and its moments in memory order)."""
    from nnforge.engine.optim import optimizer_from_flat, optimizer_to_flat

    def make():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        return conv, torch.optim.AdamW(conv.parameters(), lr=1e-2, fused=fused)

    grads = [[torch.randn_like(p) for p in make()[0].parameters()] for _ in range(6)]

    def steps(model, opt, batch):
        for g in batch:
            for p, gp in zip(model.parameters(), g, strict=True):
                p.grad = gp.clone()
            opt.step()

    straight, opt = make()
    steps(straight, opt, grads)
    resumed, opt = make()
    steps(resumed, opt, grads[:3])
    tensors, meta = optimizer_to_flat(opt)
    tensors.update({f"model.{k}": v for k, v in resumed.state_dict().items()})
    save_checkpoint(tmp_path / "last.safetensors", tensors, {"optim": meta})
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    resumed, opt = make()
    resumed.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_from_flat(opt, tensors, meta["optim"], "cpu")
    steps(resumed, opt, grads[3:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
