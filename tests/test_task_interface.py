"""The proof that a new family fits the core: a toy regression task, defined in this file and not in nnforge, trains,
resumes after SIGTERM bit-identically, evaluates, exports to ONNX and is served over HTTP through the generic paths.

    .venv/bin/pytest tests/test_task_interface.py -q
"""

from __future__ import annotations

import json
import os
import signal

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import serving_in_thread
from torch import nn

import nnforge
from nnforge.cli import main
from nnforge.config import ConfigError, EngineConfig
from nnforge.engine.checkpoint import load_checkpoint
from nnforge.engine.loop import StepContext, Trainable
from nnforge.engine.optim import OptimSpec
from nnforge.engine.run import Run
from nnforge.engine.seeding import derived_generator
from nnforge.evaluation.report import add_section, write_report
from nnforge.models import register_model
from nnforge.tasks import register_task, unregister_task
from nnforge.tasks.base import Built

FEATURES = 4
TRUE_W = torch.tensor([1.5, -2.0, 0.5, 3.0])


class Regressor(nn.Module):
    def __init__(self, in_features: int, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 1)

    def forward_features(self, x):  # (B, F) -> (B, hidden)
        return self.body(x)

    def forward(self, x):  # (B, F) -> (B, 1)
        return self.head(self.forward_features(x))


@register_model("toy_regressor", task="toy_regression", data_args=frozenset({"in_features"}))
def toy_regressor(in_features: int, hidden: int = 16):
    """Test-only: a one-hidden-layer regressor."""
    return Regressor(in_features, hidden)


class ToyConfig(EngineConfig):
    """A toy regression: y = x . w + noise, generated from the seed."""

    examples: int = 256
    """Examples generated (80% train, 10% val, 10% test)."""
    hidden: int = 16
    """Hidden units."""
    monitor: str = "val_mse"
    """Logged metric that picks the best checkpoint."""
    batch_size: int = 32
    """Examples per step."""


def make_data(cfg: ToyConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + cfg.seed)
    x = torch.randn(cfg.examples, FEATURES, generator=g)
    y = (x @ TRUE_W + 0.1 * torch.randn(cfg.examples, generator=g)).unsqueeze(1)
    a, b = int(0.8 * cfg.examples), int(0.9 * cfg.examples)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


STOP_AT: list[tuple[int, int]] = []  # (epoch, batch) at which a test sends SIGTERM


class Batches:
    def __init__(self, x, y, batch_size: int, seed: int):
        self.x, self.y, self.bs, self.seed = x, y, batch_size, seed

    def __len__(self):
        return len(self.x) // self.bs

    def epoch(self, epoch: int, start: int = 0):
        order = torch.randperm(len(self.x), generator=derived_generator(self.seed, epoch))
        for b in range(start, len(self)):
            if STOP_AT and (epoch, b) == STOP_AT[0]:
                os.kill(os.getpid(), signal.SIGTERM)  # the real signal, handled by the engine
            idx = order[b * self.bs:(b + 1) * self.bs]
            yield self.x[idx], self.y[idx]


def mse_step(models, batch, ctx: StepContext):
    x, y = batch
    with ctx.autocast():
        pred = models["model"](x)
    loss = F.mse_loss(pred.float(), y)
    ctx.update(loss)
    return len(y), {"loss": loss.detach()}


class ToyTask:
    name = "toy_regression"
    configs = {"toy": ToyConfig}

    def build(self, cfg: ToyConfig, run: Run, device) -> Built:
        data = make_data(cfg)
        torch.manual_seed(cfg.seed)
        model = Regressor(FEATURES, cfg.hidden)

        @torch.no_grad()
        def validate(models):
            x, y = data["val"]
            return {"val_mse": F.mse_loss(models["model"](x.to(device)), y.to(device)).item()}

        record = {"model": "toy_regressor", "model_kwargs": {"in_features": FEATURES, "hidden": cfg.hidden},
                  "module": "model", "io": {"verb": "predict", "input": {"kind": "tensor", "shape": [FEATURES]},
                                            "output": {"kind": "tensor"}}}
        trainable = Trainable(modules={"model": model},
                              optimizers={"model": OptimSpec.from_config(cfg, weight_decay=0.0)},
                              step=mse_step, source=Batches(*data["train"], cfg.batch_size, cfg.seed),
                              validate=validate, directions={"val_mse": "min"}, meta=record)
        return Built(trainable, {"examples": cfg.examples})

    def evaluate(self, run: Run, data=None, device="auto") -> dict:
        cfg = ToyConfig(**json.loads(json.dumps(load_checkpoint(run.checkpoint("best"))[1]["config"])))
        x, y = make_data(cfg)["test"]
        pred = nnforge.load(run.path, device=device).infer([row.tolist() for row in x])
        report = {"split": "test", "n": len(y), "mse": float(((pred - y.numpy()) ** 2).mean())}
        run.write_json("eval/report.json", report)
        worst = np.abs(pred - y.numpy()).max()
        add_section(run.path, "residuals", "Residuals", f"<p>largest |residual| {worst:.3f}</p>")
        write_report(run.path)
        return report


@pytest.fixture(scope="module", autouse=True)
def toy_task():
    register_task(ToyTask())
    yield
    unregister_task("toy_regression")


COMMON = dict(epochs=3, lr=1e-2, precision="fp32", ema=None)


def _tensors(run_path):
    return load_checkpoint(run_path / "checkpoints" / "last.safetensors")[0]


def _metrics(run_path):
    rows = Run(run_path).read_metrics()
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "elapsed_s", "examples_per_s")} for r in rows]


def test_a_task_defined_outside_nnforge_trains_resumes_evaluates_and_exports(tmp_path):
    straight = nnforge.train("toy", out=str(tmp_path), name="straight", **COMMON)
    meta = straight.meta
    assert meta["task"] == "toy_regression" and meta["train"] == "toy" and meta["monitor_mode"] == "min"
    rows = straight.read_metrics()
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and "val_mse" in rows[0] and "train_loss" in rows[0]
    assert float(rows[-1]["val_mse"]) < float(rows[0]["val_mse"])  # it learns

    # SIGTERM mid-epoch: a checkpoint at the next step, exit as interrupted; the resume continues exactly
    STOP_AT.append((1, 3))
    try:
        with pytest.raises(nnforge.engine.errors.TrainingInterrupted):
            nnforge.train("toy", out=str(tmp_path), name="interrupted", **COMMON)
    finally:
        STOP_AT.clear()
    interrupted = tmp_path / "toy" / "interrupted"
    state = load_checkpoint(interrupted / "checkpoints" / "last.safetensors")[1]["state"]
    assert state["stopped"] == "interrupted" and (state["epoch"], state["batch_in_epoch"]) == (1, 4)
    nnforge.train("toy", resume=str(interrupted))
    a, b = _tensors(straight.path), _tensors(interrupted)
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    assert _metrics(straight.path) == _metrics(interrupted)

    # evaluate through the generic verb: nnforge finds the task from meta.json
    report = nnforge.evaluate(straight)
    assert report["mse"] < float(rows[0]["val_mse"])
    html = (straight.path / "report.html").read_text()
    assert "Residuals" in html and "largest |residual|" in html and "mse" in html
    assert "Confusion" not in html  # classification's sections are for classifiers

    # predict and embed with the generic loader: tensor inputs, tensor outputs
    loaded = nnforge.load(straight)
    x = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.0, 2.0]]
    rows_out = loaded.predict(x)
    expected = loaded.model(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose([r["output"] for r in rows_out], expected, rtol=1e-6)
    assert loaded.embed(x).shape == (2, 16)
    with pytest.raises(nnforge.data.inputs.InputError, match=r"expected shape \[4\]"):
        loaded.predict([[1.0, 2.0]])

    # export: the generic exporter traces the input kind's example and checks parity on synthetic inputs
    card = nnforge.export(straight)
    assert card["io"] == meta["io"] and card["parity"]["split"] == "synthetic"
    assert card["parity"]["top1_agreement"] is None and card["parity"]["max_abs_diff"] < 1e-5
    session = ort.InferenceSession(str(straight.path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": np.asarray(x, dtype=np.float32)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)



def test_the_server_serves_a_task_it_does_not_know(tmp_path):
    """The server imports no task: the run's io (tensor in, tensor out) shapes requests and answers."""


    run = nnforge.train("toy", out=str(tmp_path), name="served", **COMMON)
    with serving_in_thread(run.path) as url:
        x = [[0.5, 0.5, -0.5, 1.0]]
        r = httpx.post(url + "/v1/predict", json={"inputs": x})
        assert r.status_code == 200, r.text
        expected = nnforge.load(run).model(torch.tensor(x)).detach().numpy()
        np.testing.assert_allclose(r.json()["predictions"][0]["output"], expected[0], rtol=1e-5)
        bad = httpx.post(url + "/v1/predict", json={"inputs": [[1, 2]]})
        assert bad.status_code == 400 and "expected shape [4]" in bad.json()["detail"]
        other = httpx.post(url + "/v1/generate", json={"n": 1})  # every verb has a route; a run answers its own
        assert other.status_code == 404 and "answers POST /v1/predict" in other.json()["detail"]
        info = httpx.get(url + "/v1/model").json()
        assert info["output"] == {"kind": "tensor"} and info["preprocessing"]["kind"] == "tensor"


def test_monitor_must_be_a_logged_metric_and_list_models_groups_by_task(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"monitor 'val_acc'.*val_mse \(min\)"):
        nnforge.train("toy", out=str(tmp_path), name="m", monitor="val_acc", **COMMON)
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    assert "classify:" in out and "toy_regression:" in out
    assert out.index("resnet_tiny") < out.index("toy_regression:") < out.index("toy_regressor")
