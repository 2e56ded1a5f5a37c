"""A loaded model for serving: ONNX Runtime when RUN/model.onnx exists (and matches the checkpoint), else PyTorch.

    engine = load_engine("runs/image/exp1")            # backend="auto" | "onnx" | "torch"
    x = engine.input.batch([engine.input.decode(png_bytes)])
    rows = engine.output.rows(["shoe.png"], engine.output.finish(engine.forward(x)), top_k=3)

Either way the input goes through the run's own input kind (the code `nnforge predict` uses), so a file gets the
same answer from `predict` and from the server, and the run's output kind words the answer: the server knows no
task. The ONNX path imports no PyTorch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnforge.data.inputs import InputKind, build_input
from nnforge.deploy.artifacts import CARD_FILE, INT8_FILE, MODEL_FILE, card_io, ort_session, read_card, sha256_file
from nnforge.outputs import OutputKind, build_output

log = logging.getLogger("nnforge.serve")


@dataclass
class Engine:
    run: Path
    backend: str          # "onnx", "onnx-int8" or "torch"
    name: str             # the architecture, e.g. resnet_tiny
    version: str          # first 12 hex digits of the served file's sha256
    io: dict              # the run's inputs and outputs by kind (verb, input spec, output spec)
    input: InputKind      # reads and batches inputs
    output: OutputKind    # turns raw outputs into answers
    forward: Callable[[np.ndarray], np.ndarray]  # (B, ...) model input -> raw outputs (logits for classifiers)
    tensor: dict          # the model's input tensor: name, dtype, shape
    load_seconds: float = 0.0

    @property
    def kind(self) -> str:
        return self.input.name

    @property
    def verb(self) -> str:
        return self.io.get("verb", "predict")

    def describe(self) -> dict:
        out = {"name": self.name, "version": self.version, "backend": self.backend, "run": self.run.name,
               "verb": self.verb, "kind": self.kind, "input": self.tensor, "preprocessing": self.io["input"],
               "output": self.output.describe()}
        if "classes" in self.io["output"]:
            out.update(classes=list(self.io["output"]["classes"]), num_classes=len(self.io["output"]["classes"]))
        return out

    def warm(self, max_batch_size: int) -> None:
        """Run the largest and smallest batches once, so the first requests do not pay for allocation."""
        for n in sorted({1, max_batch_size}, reverse=True):
            self.forward(self.input.batch(list(self.input.example(n))))


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
        io = card_io(card)
        path = run / (INT8_FILE if int8 else card["file"])
        session = ort_session(path, threads)
        name = session.get_inputs()[0].name

        def forward(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]

        engine = Engine(run, "onnx-int8" if int8 else "onnx", card.get("model", "?"), sha256_file(path)[:12], io,
                        build_input(io["input"], run), build_output(io["output"], run), forward, card.get("input", {}))
    else:
        import torch

        from nnforge.inference import Loaded

        if threads:
            torch.set_num_threads(threads)  # the server leaves a core to its event loop
        loaded = Loaded(run, device=device)
        example = loaded.input.example(1)
        tensor = {"name": "input", "dtype": str(example.dtype), "shape": ["batch", *example.shape[1:]]}
        engine = Engine(run, "torch", loaded.name, sha256_file(loaded.run.checkpoint("best"))[:12], loaded.io,
                        loaded.input, loaded.output, loaded.forward, tensor)
    engine.load_seconds = time.perf_counter() - t0
    return engine
