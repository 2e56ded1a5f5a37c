"""A trained run, ready to use: `nnforge.load(run)`. Works for every task without importing it.

    loaded = nnforge.load("runs/image/exp1")
    loaded.io                                   # {"verb": "predict", "input": {"kind": "image", ...},
                                                #  "output": {"kind": "probs", "classes": [...]}}
    loaded.predict(["shoe.png"], top_k=3)       # rows, as the output kind words them
    loaded.predict_proba(["shoe.png"])          # (N, K) for classifiers
    loaded.embed(["shoe.png"])                  # (N, D): the features before the head

Everything comes from the checkpoint: the registered model and its arguments, which named module to run (the EMA
copy when there is one), and `io`, what the model takes and returns by kind (data/inputs.py, outputs.py). Loading
reads tensors and JSON only; nothing is unpickled. Export and the server load runs through here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nnforge.data.inputs import InputError, build_input
from nnforge.engine.checkpoint import load_checkpoint
from nnforge.engine.device import resolve_device
from nnforge.engine.run import Run
from nnforge.outputs import build_output


def model_record(meta: dict) -> dict:
    """The checkpoint's model record (model, model_kwargs, module, io), also for checkpoints written before tasks
    (classifiers that kept spec, classes and an ema flag)."""
    if "io" in meta:
        return meta
    return {**meta, "model_kwargs": {**meta["model_kwargs"], "num_classes": meta["num_classes"]},
            "module": "ema" if meta.get("ema") else "model",
            "io": {"verb": "predict", "input": meta["spec"], "output": {"kind": "probs", "classes": meta["classes"]}}}


class Loaded:
    """A run's model with its input and output kinds. Loads tensors and JSON only; never unpickles anything."""

    def __init__(self, run: str | Path, which: str = "best", device: str = "auto"):
        from nnforge.models import create_model  # registers the built-in models

        self.run = Run(run)
        tensors, meta = load_checkpoint(self.run.checkpoint(which))
        self.meta = model_record(meta)
        self.io = self.meta["io"]
        self.device = resolve_device(device)
        self.model = create_model(self.meta["model"], **self.meta["model_kwargs"])
        prefix = self.meta["module"] + "."
        self.model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.model.to(self.device).eval()
        self.input = build_input(self.io["input"], self.run.path)
        self.output = build_output(self.io["output"], self.run.path)
        # Image convolutions run ~2x faster channels-last on CPUs (oneDNN) and GPUs; still fp32, like the export.
        self.channels_last = self.input.example(1).ndim == 4 and self.device.type != "mps"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @property
    def name(self) -> str:
        return self.meta["model"]

    @property
    def classes(self) -> list[str]:
        return list(self.io["output"].get("classes", []))

    def _tensor(self, arrays: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(arrays).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @torch.no_grad()
    def forward(self, arrays: np.ndarray) -> np.ndarray:
        """A batch of model inputs -> the raw outputs (logits for a classifier), float32."""
        return self.model(self._tensor(arrays)).float().cpu().numpy()

    @torch.no_grad()
    def features(self, arrays: np.ndarray) -> np.ndarray:
        """A batch of model inputs -> the (B, D) features before the head."""
        if not hasattr(self.model, "forward_features"):
            raise ValueError(f"model '{self.name}' has no forward_features: it cannot embed")
        return self.model.forward_features(self._tensor(arrays)).float().cpu().numpy()

    def chunks(self, inputs: list, batch_size: int = 512, fn=None):
        """Per chunk: (indices of the usable inputs, their raw outputs or None, [(index, reason)] of the others).

        Each input is read once, and only one chunk is held in memory at a time. fn: forward (default) or features.
        """
        fn = fn or self.forward
        for start in range(0, len(inputs), batch_size):
            good, arrays, bad = [], [], []
            for i in range(start, min(start + batch_size, len(inputs))):
                try:
                    arrays.append(self.input.load(inputs[i]))
                    good.append(i)
                except InputError as err:
                    bad.append((i, str(err)))
            yield good, (fn(self.input.batch(arrays)) if arrays else None), bad

    def _all(self, inputs: list, fn, batch_size: int) -> np.ndarray:
        out = []
        for _, raw, bad in self.chunks(inputs, batch_size, fn):
            if bad:
                raise InputError(bad[0][1])
            if raw is not None:
                out.append(raw)
        if not out:
            raise InputError("no inputs")
        return np.concatenate(out)

    def infer(self, inputs: list, batch_size: int = 256) -> np.ndarray:
        """The finished outputs (class probabilities, ...) of every input; InputError names the first bad one."""
        return self.output.finish(self._all(inputs, self.forward, batch_size))

    def predict_proba(self, inputs: list, batch_size: int = 256) -> np.ndarray:
        """(N, K) class probabilities (classifiers)."""
        if self.output.name != "probs":
            raise ValueError(f"{self.run.path} is not a classifier (its output is {self.output.name})")
        return self.infer(inputs, batch_size)

    def embed(self, inputs: list, batch_size: int = 256) -> np.ndarray:
        """(N, D) features before the head, for retrieval, clustering or a recommender's item vectors."""
        return self._all(inputs, self.features, batch_size)

    def predict(self, inputs: list, **options) -> list[dict]:
        """One answer row per input (options as the output kind takes them, e.g. top_k)."""
        rows, bad = self.predict_safely(inputs, **options)
        if bad:
            raise InputError(f"{bad[0]['input']}: {bad[0]['error']}")
        return rows

    def predict_safely(self, inputs: list, **options) -> tuple[list[dict], list[dict]]:
        """Answer what can be answered; bad inputs come back with their reason instead of stopping the batch."""
        rows, bad = [], []
        for good, raw, failed in self.chunks(inputs):
            if raw is not None:
                names = [self.input.describe(inputs[i]) for i in good]
                # an answer that depends on the question (a recommender's k, the items to leave out) reads it again
                asked = {"inputs": [self.input.load(inputs[i]) for i in good]} if self.output.takes_inputs else {}
                rows += self.output.rows(names, self.output.finish(raw), **asked, **options)
            bad += [{"input": self.input.describe(inputs[i]), "error": reason} for i, reason in failed]
        return rows, bad


def load(run, which: str = "best", device: str = "auto") -> Loaded:
    return Loaded(run.path if isinstance(run, Run) else run, which=which, device=device)
