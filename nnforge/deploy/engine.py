"""A loaded model for serving: ONNX Runtime when RUN/model.onnx exists (and matches the checkpoint), else PyTorch.

    engine = load_engine("runs/image/exp1")            # backend="auto" | "onnx" | "torch"
    x = engine.preprocessor.batch([engine.preprocessor.decode(png_bytes)])
    probs = softmax(engine.logits(x))                  # (B, K)

Either way the input goes through the run's own preprocessor (the code `nnforge predict` uses), so a file gets
the same answer from `predict` and from the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnforge.data.preprocess import build_preprocessor
from nnforge.deploy.artifacts import CARD_FILE, INT8_FILE, MODEL_FILE, ort_session, read_card, sha256_file

log = logging.getLogger("nnforge.serve")


@dataclass
class Engine:
    run: Path
    backend: str          # "onnx", "onnx-int8" or "torch"
    name: str             # the architecture, e.g. resnet_tiny
    version: str          # first 12 hex digits of the served file's sha256
    kind: str             # "image" or "text"
    spec: dict            # the preprocessing spec (size, mean, std / tokenizer settings)
    classes: list[str]
    preprocessor: object
    logits: Callable[[np.ndarray], np.ndarray]  # (B, ...) model input -> (B, K) float32 logits
    input: dict = field(default_factory=dict)
    load_seconds: float = 0.0

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "backend": self.backend, "run": self.run.name,
                "kind": self.kind, "classes": self.classes, "num_classes": len(self.classes),
                "input": self.input, "preprocessing": self.spec}

    def warm(self, max_batch_size: int) -> None:
        """Run the largest and smallest batches once, so the first requests do not pay for allocation."""
        pre = self.preprocessor
        for n in sorted({1, max_batch_size}, reverse=True):
            self.logits(pre.batch(list(pre.example(n))))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _stale_reason(run: Path, card: dict) -> str | None:
    """Why model.onnx should not be served for this run, or None when it matches the checkpoint it came from."""
    src = card.get("source", {})
    ckpt = run / src.get("checkpoint", "checkpoints/best.safetensors")
    if ckpt.is_file() and src.get("sha256") and sha256_file(ckpt) != src["sha256"]:
        return f"{ckpt} changed after the export (re-run `nnforge export {run}`)"
    return None


def choose_backend(run: str | Path, backend: str = "auto", int8: bool = False) -> str:
    run = Path(run)
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"backend {backend!r}: expected auto, onnx or torch")
    has_onnx = (run / MODEL_FILE).is_file() and (run / CARD_FILE).is_file()
    if int8 and not (run / INT8_FILE).is_file():
        raise FileNotFoundError(f"{run / INT8_FILE}: missing; run `nnforge export {run} --quantize int8`")
    if backend == "onnx" or int8:
        if not has_onnx:
            raise FileNotFoundError(f"{run / MODEL_FILE} or {run / CARD_FILE}: missing; run `nnforge export {run}`")
        return "onnx"
    if backend == "torch":
        return "torch"
    if not has_onnx:
        log.info("no %s in %s: serving with PyTorch (nnforge export makes serving faster)", MODEL_FILE, run)
        return "torch"
    reason = _stale_reason(run, read_card(run))
    if reason:
        log.warning("not serving %s: %s; serving the checkpoint with PyTorch", run / MODEL_FILE, reason)
        return "torch"
    return "onnx"


def load_engine(run: str | Path, backend: str = "auto", int8: bool = False, device: str = "auto",
                threads: int = 0) -> Engine:
    """Load RUN for serving. threads: intra-op threads of ONNX Runtime or torch (0 = the library's default)."""
    t0 = time.perf_counter()
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    chosen = choose_backend(run, backend, int8)
    if chosen == "onnx":
        card = read_card(run)
        path = run / (INT8_FILE if int8 else card["file"])
        session = ort_session(path, threads)
        name = session.get_inputs()[0].name

        def logits(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]

        engine = Engine(run, "onnx-int8" if int8 else "onnx", card.get("model", "?"), sha256_file(path)[:12],
                        card["kind"], card["spec"], list(card["classes"]), build_preprocessor(card["spec"], run),
                        logits, card.get("input", {}))
    else:
        import torch

        from nnforge.tasks.classify import Predictor

        if threads:
            torch.set_num_threads(threads)  # the server leaves a core to its event loop
        pred = Predictor(run, device=device)
        ckpt = pred.run.checkpoint("best")
        shape = ["batch", *pred.preprocessor.example(1).shape[1:]]
        engine = Engine(run, "torch", pred.meta["model"], sha256_file(ckpt)[:12], pred.spec["kind"], pred.spec,
                        list(pred.classes), pred.preprocessor, pred.logits,
                        {"name": "input", "dtype": str(pred.preprocessor.example(1).dtype), "shape": shape})
    engine.load_seconds = time.perf_counter() - t0
    return engine
