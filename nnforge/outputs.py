"""Output kinds: what a model's raw outputs mean and how they become answers. Numpy only (and Pillow for a
generator's PNGs), so the server's ONNX Runtime path imports no PyTorch.

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
    agreement_name = "top-1 agreement"  # what agreement() measures, as export reports it
    reads_run = False  # built with the run folder too: answers drawn from its files (a recommender's catalogue)
    takes_inputs = False  # rows() also gets the decoded inputs: answers that depend on the question (k, seen items)

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


class ActionOutput(OutputKind):
    """A policy's raw output -> its action. The spec's head says how the output row is laid out:

        categorical  (B, n + 1): action logits, then the state value -> action, probabilities, value
        gaussian     (B, d + 1): the action mean, then the state value -> action (clipped to low/high), value
        q            (B, n):     action values (DQN) -> action, q_values

    The deterministic action: the most probable, the mean, or the greedy one."""

    name = "action"
    response_key = "actions"

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.head = spec.get("head")
        if self.head not in ("categorical", "gaussian", "q"):
            raise ValueError(f"the run's action spec has head {self.head!r}; expected categorical, gaussian or q")
        size = spec.get("n") if self.head != "gaussian" else spec.get("dim")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_CLASSES:
            raise ValueError(f"the run's action spec has size {size!r}; expected a whole number from 1")
        self.size = size
        if self.head == "gaussian":
            self.low = np.asarray(spec.get("low", [-np.inf] * size), dtype=np.float32)
            self.high = np.asarray(spec.get("high", [np.inf] * size), dtype=np.float32)
            if self.low.shape != (size,) or self.high.shape != (size,):
                raise ValueError(f"the run's action spec has bounds of the wrong length; expected {size} each")

    def actions(self, values: np.ndarray) -> np.ndarray:
        """(B,) action indices, or (B, d) continuous actions within the bounds."""
        if self.head == "gaussian":
            return np.clip(values[:, :self.size], self.low, self.high)
        return values[:, :self.size].argmax(1)

    def rows(self, names: list[str], values: np.ndarray, **_) -> list[dict]:
        acts = self.actions(values)
        out = []
        for i, name in enumerate(names):
            row = {"input": name, "action": acts[i].tolist()}
            if self.head == "categorical":
                row["probabilities"] = softmax(values[i:i + 1, :self.size].astype(np.float32))[0].tolist()
            if self.head == "q":
                row["q_values"] = values[i].tolist()
            else:
                row["value"] = float(values[i, self.size])
            out.append(row)
        return out

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float | None:
        if self.head == "gaussian":
            return None  # continuous: the exporter's |difference| bound is the check
        return float((self.actions(a) == self.actions(b)).mean())


class ImageOutput(OutputKind):
    """A generator's images: tanh outputs in [-1, 1], (B, C, H, W) -> 8-bit pictures; an answer is a base64 PNG."""

    name = "image"
    response_key = "images"
    agreement_name = "images within one 8-bit level"

    def finish(self, raw: np.ndarray) -> np.ndarray:
        return to_uint8(raw)

    def rows(self, names: list[str], values: np.ndarray, **_) -> list[dict]:
        import base64

        return [{"input": n, "png": base64.b64encode(png_bytes(v)).decode("ascii")}
                for n, v in zip(names, values, strict=True)]

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float:
        """Share of images whose 8-bit pixels all agree within one level (what a viewer of the PNG could see)."""
        diff = np.abs(to_uint8(a).astype(np.int16) - to_uint8(b).astype(np.int16))
        return float((diff.reshape(len(diff), -1).max(1) <= 1).mean())


def to_uint8(raw: np.ndarray) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8, rounded."""
    x = np.clip((np.asarray(raw, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C 1 or 3 -> PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


class ItemsOutput(OutputKind):
    """A recommender's user vectors -> ranked items of the run's catalogue: ids, titles and scores.

    Each input is a request row of the history kind (nnforge/data/history_input.py): it says how many items, whether
    to leave the user's own items out, whether the user is unknown (then the answer is the training popularity, with
    "fallback": "popular") and whether it asks for items like one item (cosine to that item's vector)."""

    name = "items"
    response_key = "recommendations"
    options = {"top_k": 10}
    reads_run = True
    takes_inputs = True

    def __init__(self, spec: dict, run_dir):
        super().__init__(spec)
        self.run_dir = run_dir

    @property
    def catalogue(self):  # read on first use, and again after items are added (data/catalogue.py)
        from nnforge.data.catalogue import Catalogue

        return Catalogue.open(self.run_dir)

    @property
    def users(self):
        from nnforge.data.catalogue import UserHistories

        return UserHistories.open(self.run_dir)

    def rows(self, names: list[str], values: np.ndarray, inputs: list[np.ndarray] | None = None, **_) -> list[dict]:
        from nnforge.data.history_input import EXCLUDE_SEEN, FLAGS, HISTORY, SIMILAR, UNKNOWN_USER, USER, K

        cat, users = self.catalogue, self.users
        if inputs is None or len(inputs) != len(names):
            raise ValueError("the items output kind answers request rows; pass inputs= (one row per answer)")
        if values.shape[1] != cat.vectors.shape[1]:
            raise ValueError(f"the model gives {values.shape[1]}-dimensional users but items.safetensors holds "
                             f"{cat.vectors.shape[1]}-dimensional items: rebuild it with `nnforge evaluate RUN`")
        out = []
        for name, vector, row in zip(names, values, inputs, strict=True):
            k, flags, user, history = int(row[K]), int(row[FLAGS]), int(row[USER]), row[HISTORY:]
            seen = users.history(user) if user >= 0 else history[history >= 0]
            exclude = seen if flags & EXCLUDE_SEEN else np.zeros(0, np.int64)
            fallback = None
            if flags & UNKNOWN_USER:
                fallback = "popular"
                top, scores = cat.search(vector[None], k, [exclude], scores=cat.popularity[None])
            elif flags & SIMILAR:
                top, scores = cat.search(cat.vectors[seen[-1:]], k, [exclude], cosine=True)
            else:
                top, scores = cat.search(vector[None], k, [exclude])
            out.append({"input": name, "items": [cat.ids[i] for i in top[0]], "titles": [cat.titles[i] for i in top[0]],
                        "scores": [round(float(v), 6) for v in scores[0]], "fallback": fallback})
        return out

    def describe(self) -> dict:
        return {**self.spec, "num_items": len(self.catalogue), "known_users": len(self.users.ids),
                "search": "faiss-hnsw" if self.catalogue.uses_faiss else "exact"}


_KINDS: dict[str, type[OutputKind]] = {"probs": Probs, "tensor": TensorOutput, "action": ActionOutput,
                                       "image": ImageOutput, "items": ItemsOutput}


def register_output_kind(name: str, cls: type[OutputKind]) -> None:
    if name in _KINDS:
        raise ValueError(f"output kind '{name}' is registered twice")
    _KINDS[name] = cls


def build_output(spec: dict, run_dir=None) -> OutputKind:
    """The output kind named by spec["kind"]; run_dir for kinds that answer from the run's files (reads_run)."""
    kind = spec.get("kind", "")
    if kind not in _KINDS:
        raise ValueError(f"unknown output kind {kind!r} in the run; known: {', '.join(sorted(_KINDS))}")
    cls = _KINDS[kind]
    if not cls.reads_run:
        return cls(spec)
    if run_dir is None:
        raise ValueError(f"the {kind} output kind answers from files in its run folder; none was given")
    return cls(spec, run_dir)
