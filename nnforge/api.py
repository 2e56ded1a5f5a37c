"""The Python API; the command line is a thin layer over it.

    import nnforge
    run = nnforge.train("image", data="data/fashion-mnist", epochs=3)
    nnforge.evaluate(run)
    nnforge.load(run).predict(["shoe.png"], top_k=3)
"""

from __future__ import annotations

from pathlib import Path

from nnforge.config import ConfigError, load_config, read_yaml_mapping
from nnforge.engine.run import Run
from nnforge.tasks import get_task, train_target, train_targets


def _run_path(run) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def task_of(run) -> str:
    """The task that trained RUN (meta.json); runs from before tasks recorded their input type instead."""
    path = _run_path(run)
    meta = Run(path).read_json("meta.json")
    name = meta.get("task", "")
    targets = train_targets()
    return targets[name][0] if name in targets else name


def train(task: str, config: str | Path | None = None, resume: str | Path | None = None, **overrides) -> Run:
    """Train a model for `task` (image, text, ...: `nnforge train --help` lists them); keyword arguments are config
    fields and win over the file.

    resume: a run folder to continue from its last checkpoint (pass a larger `epochs` to extend a finished run).
    """
    from nnforge.tasks.base import train_run

    _, cls = train_target(task)
    base = None
    if resume is not None:
        run = Path(resume)
        if not (run / "checkpoints" / "last.safetensors").is_file():
            raise FileNotFoundError(f"{run}: no checkpoints/last.safetensors to resume from")
        trained_as = Run(run).read_json("meta.json").get("train") or Run(run).read_json("meta.json").get("task")
        if trained_as != task:
            raise ConfigError(f"{run} was trained with `nnforge train {trained_as}`, not `{task}`")
        base = read_yaml_mapping(run / "config.yaml")
    cfg = load_config(cls, config, overrides, base=base)
    return train_run(task, cfg, resume=str(resume) if resume is not None else None)


def load(run, which: str = "best", device: str = "auto"):
    """A trained run ready to use, whatever its task (tensors and JSON only; nothing is unpickled)."""
    from nnforge.inference import load as load_run

    return load_run(_run_path(run), which=which, device=device)


def evaluate(run, data: str | None = None, device: str = "auto") -> dict:
    """The run's task evaluates it into RUN/eval/ and RUN/report.html (classification: report, confusion matrix,
    worst mistakes); returns the headline metrics."""
    return get_task(task_of(run)).evaluate(Run(_run_path(run)), data=data, device=device)


def predict(run, inputs: list, **options) -> list[dict]:
    """One answer per input, e.g. top-k labels and probabilities for a classifier (options: top_k)."""
    return load(run).predict(inputs, **options)


def doctor(task: str = "image", config: str | Path | None = None, out: str | Path | None = None,
           only: list[str] | None = None, **overrides) -> dict:
    """Check data, model and recipe of a classifier before a long run: PASS / WARN / FAIL per check, into
    OUT/doctor.json.

    Keyword arguments are config fields as for train(); `model` may also be an nn.Module to examine.
    out: the doctor's folder (default runs/doctor/<data folder name>). only: a subset of the checks
    (data, batch, init_loss, lr_range, baseline, overfit). Returns what doctor.json holds ("status": worst).
    """
    task_name, cls = train_target(task)
    if task_name != "classify":
        raise ConfigError(f"the doctor examines classifiers (image, text), not '{task}'")
    module = overrides.pop("model", None)
    if isinstance(module, str):
        overrides["model"], module = module, None
    from nnforge.tasks.doctor import run_doctor

    return run_doctor(load_config(cls, config, overrides), out=out, model=module, only=only)


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
