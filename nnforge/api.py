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
