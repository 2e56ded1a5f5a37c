"""Output kinds: what a model's raw outputs mean and how they become answers. Numpy only, so the server's ONNX
Runtime path imports no PyTorch.

    out = build_output({"kind": "probs", "classes": ["cat", "dog"]})
    rows = out.rows(["a.png"], out.finish(raw_logits), top_k=1)    # [{"input": "a.png", "labels": [...], ...}]

A task records its model's output spec in the run (`io.output`); `nnforge predict`, the server and export read it
from there, so they handle every family without importing its task. A new family adds its kind with
`register_output_kind`.
"""

from __future__ import annotations

import numpy as np

MAX_CLASSES = 1_000_000  # a run folder is data: its values are checked before anything is sized from them


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class OutputKind:
    name = ""
    options: dict = {}  # answer options and their defaults (the server's query parameters)
    response_key = "predictions"  # where the server's JSON answer lists the rows

    def __init__(self, spec: dict):
        self.spec = spec

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """The model's raw output batch -> the numbers an answer reports."""
        return raw

    def rows(self, names: list[str], values: np.ndarray, **options) -> list[dict]:
        return [{"input": n, "output": v.tolist()} for n, v in zip(names, values, strict=True)]

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """How often two raw outputs give the same answer (export parity); None where "the same" means close."""
        return None

    def describe(self) -> dict:
        return dict(self.spec)


class Probs(OutputKind):
    """Class logits -> probabilities; an answer is the top-k labels with their probabilities."""

    name = "probs"
    options = {"top_k": 3}

    def __init__(self, spec: dict):
        super().__init__(spec)
        classes = spec.get("classes")
        if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
            raise ValueError(f"the run's output spec has {type(classes).__name__} classes; expected a list of 1 to "
                             f"{MAX_CLASSES} names")
        self.classes = [str(c) for c in classes]

    def finish(self, raw: np.ndarray) -> np.ndarray:
        return softmax(raw.astype(np.float32))

    def rows(self, names: list[str], values: np.ndarray, top_k: int = 3, **_) -> list[dict]:
        k = min(top_k, len(self.classes))
        top = np.argsort(-values, axis=1, kind="stable")[:, :k]
        return [{"input": n, "labels": [self.classes[j] for j in row], "probs": [float(p[j]) for j in row]}
                for n, row, p in zip(names, top, values, strict=True)]

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float:
        return float((a.argmax(1) == b.argmax(1)).mean())

    def describe(self) -> dict:
        return {**self.spec, "num_classes": len(self.classes)}


class TensorOutput(OutputKind):
    """Plain numbers (a regression, an embedding): the answer is the output as nested lists."""

    name = "tensor"


_KINDS: dict[str, type[OutputKind]] = {"probs": Probs, "tensor": TensorOutput}


def register_output_kind(name: str, cls: type[OutputKind]) -> None:
    if name in _KINDS:
        raise ValueError(f"output kind '{name}' is registered twice")
    _KINDS[name] = cls


def build_output(spec: dict) -> OutputKind:
    kind = spec.get("kind", "")
    if kind not in _KINDS:
        raise ValueError(f"unknown output kind {kind!r} in the run; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[kind](spec)
