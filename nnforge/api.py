"""The Python API; the command line is a thin layer over it.

    import nnforge
    run = nnforge.train("image", data="data/fashion-mnist", epochs=3)
    nnforge.evaluate(run)
    nnforge.load(run).predict(["shoe.png"], top_k=3)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nnforge.config import TRAIN_CONFIGS, ConfigError, build_config, load_config
from nnforge.engine.run import Run


def _run_path(run) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def train(task: str, config: str | Path | None = None, resume: str | Path | None = None, **overrides) -> Run:
    """Train a model for `task` ("image" or "text"); keyword arguments are config fields and win over the file.

    resume: a run folder to continue from its last checkpoint (pass a larger `epochs` to extend a finished run).
    """
    if task not in TRAIN_CONFIGS:
        raise ConfigError(f"unknown task '{task}'; expected one of {', '.join(TRAIN_CONFIGS)}")
    cls = TRAIN_CONFIGS[task]
    if resume is not None:
        run = Path(resume)
        if not (run / "checkpoints" / "last.safetensors").is_file():
            raise FileNotFoundError(f"{run}: no checkpoints/last.safetensors to resume from")
        values = yaml.safe_load((run / "config.yaml").read_text())
        if config is not None:
            values.update(yaml.safe_load(Path(config).read_text()) or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = build_config(cls, values)
    else:
        cfg = load_config(cls, config, overrides)
    from nnforge.tasks.classify import train_classifier

    return train_classifier(cfg, resume=str(resume) if resume is not None else None)


def load(run, which: str = "best", device: str = "auto"):
    """A trained run ready to predict (tensors and JSON only; nothing is unpickled)."""
    from nnforge.tasks.classify import Predictor

    return Predictor(_run_path(run), which=which, device=device)


def evaluate(run, data: str | None = None, device: str = "auto") -> dict:
    """Classification report, confusion matrix and worst mistakes into RUN/eval/ (and RUN/report.html)."""
    from nnforge.tasks.classify import evaluate_run

    return evaluate_run(_run_path(run), data=data, device=device)


def predict(run, inputs: list, top_k: int = 3) -> list[dict]:
    return load(run).predict(inputs, top_k=top_k)


def doctor(task: str = "image", config: str | Path | None = None, out: str | Path | None = None,
           only: list[str] | None = None, **overrides) -> dict:
    """Check data, model and recipe before a long run: PASS / WARN / FAIL per check, into OUT/doctor.json.

    Keyword arguments are config fields as for train(); `model` may also be an nn.Module to examine.
    out: the doctor's folder (default runs/doctor/<data folder name>). only: a subset of the checks
    (data, batch, init_loss, lr_range, baseline, overfit). Returns what doctor.json holds ("status": worst).
    """
    if task not in TRAIN_CONFIGS:
        raise ConfigError(f"unknown task '{task}'; expected one of {', '.join(TRAIN_CONFIGS)}")
    module = overrides.pop("model", None)
    if isinstance(module, str):
        overrides["model"], module = module, None
    from nnforge.tasks.doctor import run_doctor

    return run_doctor(load_config(TRAIN_CONFIGS[task], config, overrides), out=out, model=module, only=only)


def compare(run_a, run_b, output: str | Path | None = None, threshold: float = 0.01) -> dict:
    """Per-metric and per-class differences (b - a) of two evaluated runs, also written as JSON.

    output: where the JSON goes (default RUN_A/compare_<RUN_B folder name>.json); its path is under "output".
    """
    import json

    from nnforge.evaluation.compare import compare_runs

    a, b = _run_path(run_a), _run_path(run_b)
    result = compare_runs(a, b, threshold=threshold)
    path = Path(output) if output is not None else a / f"compare_{b.name}.json"
    result["output"] = str(path)
    path.write_text(json.dumps(result, indent=2))
    return result


def export(run, opset: int | None = None, quantize: str | None = None, **options) -> dict:
    """RUN/model.onnx checked against PyTorch, RUN/model.json beside it (and RUN/model.int8.onnx for "int8").

    options: tolerance, exporter ("auto" | "dynamo" | "torchscript"), which ("best" | "last").
    """
    from nnforge.deploy.export import export_onnx

    return export_onnx(_run_path(run), opset=opset, quantize=quantize, **options)


def serve(run, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, token: str | None = None,
          **options) -> None:
    """Serve RUN over HTTP until SIGTERM; options are nnforge.deploy.server.ServeSettings fields."""
    import os

    from nnforge.deploy.settings import ServeSettings

    settings = ServeSettings(str(_run_path(run)), host, port, workers, token or os.environ.get("NNFORGE_TOKEN"),
                             **options)
    settings.check()  # a refused flag fails before the server's heavy imports
    from nnforge.deploy.server import serve as run_server

    run_server(settings)
