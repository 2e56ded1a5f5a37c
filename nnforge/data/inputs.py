"""Input kinds: how one kind of model input is read, batched and described. The one preprocessing path for
evaluate, predict, export and serve, whatever the task.

    pre = build_input(meta["io"]["input"], run_dir)       # the run records its input spec; "kind" picks the class
    x = pre.batch([pre.load("shoe.png")])                  # float32 (1, C, H, W), normalised as in training
    x = pre.batch([pre.decode(png_bytes)])                 # the same from an HTTP body

A kind says where its inputs come from on the command line (`expand`, `load`), in a request (`decode`, and for
JSON bodies `json_key` and `from_json`), what a batch looks like (`batch`, `dtype`, `dynamic_axes`) and how to
make a dummy one (`example`, `synthetic`). Kinds live here, below tasks, inference and deploy: a new family adds
its kind with `register_input_kind` and the server, `predict` and `export` handle it without knowing the task.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
from pathlib import Path

import numpy as np

from nnforge.data.imageio import MAX_PIXELS, ImageError, decode_image


class InputError(ValueError):
    """One input cannot be turned into a model input; the message says why (HTTP 4xx, CLI error)."""


class TooManyInputs(InputError):
    """A request carries more inputs than the server takes (HTTP 413)."""


# A run folder is data: a value read from it is checked before anything is allocated from it.
MAX_SIDE, MAX_TOKENS, MAX_ELEMENTS = 8192, 65536, 10_000_000


FLOAT32_MAX = float(np.finfo(np.float32).max)


def whole(value):
    """A JSON whole number as an int (JSON Schema's integer includes 9.0), else the value unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def bounded(spec: dict, key: str, lo: int, hi: int) -> int:
    """spec[key] as an int within [lo, hi], or a ValueError that names it (a damaged or crafted run)."""
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or not lo <= value <= hi:
        raise ValueError(f"the run's input spec has {key}={value!r}; expected a whole number from {lo} to {hi}")
    return int(value)


class InputKind:
    """The shared part of every input kind: JSON payloads, batching by stacking, naming an input."""

    name = ""
    dtype = "float32"
    dynamic_axes: dict[int, str] = {0: "batch"}
    json_key = "inputs"              # a JSON request body carries {json_key: [...]}
    body_types: tuple[str, ...] = ()  # Content-Type prefixes whose whole body is one input
    multipart = False                # whether files of a multipart form are inputs

    def expand(self, items: list[str]) -> list:
        """Command-line arguments -> inputs."""
        return list(items)

    def load(self, item) -> np.ndarray:
        """One input as the CLI or the Python API gives it."""
        return self.decode(item)

    def decode(self, raw) -> np.ndarray:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    def from_json(self, value, where: str):
        """One element of the JSON list -> what decode() takes."""
        return value

    def read_json(self, data, max_inputs: int) -> list[tuple[str, object]]:
        """A JSON request body -> (name, raw input) pairs. By default {json_key: [input, ...]}; a kind whose
        requests read otherwise (a generator's {"n": 8, "seed": 7}, a policy's {"observation": [...]}) overrides
        this. InputError for a body that does not fit, TooManyInputs beyond max_inputs."""
        key = self.json_key
        if not isinstance(data, dict) or key not in data:
            raise InputError(f"expected a JSON object with a \"{key}\" list; this run takes {self.name} inputs")
        values = data[key]
        if not isinstance(values, list) or not values:
            raise InputError(f"\"{key}\" must be a non-empty list")
        if len(values) > max_inputs:
            raise TooManyInputs(f"{len(values)} inputs in one request; the limit is {max_inputs}")
        return [(f"{key}[{i}]", self.from_json(v, f"{key}[{i}]")) for i, v in enumerate(values)]

    def batch(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays).astype(self.dtype)

    def example(self, n: int = 2) -> np.ndarray:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    def synthetic(self, n: int = 16) -> list[np.ndarray]:
        """Inputs for a parity check when the run's own data is gone."""
        return list(self.example(n))

    def parity_inputs(self, run_dir: str | Path) -> tuple[str, list[np.ndarray]]:
        """(where they came from, inputs) for an export's parity check when the run keeps no split.json: inputs
        the run recorded for this (a policy's observations), else synthetic ones."""
        return "synthetic", self.synthetic()

    def describe(self, item) -> str:
        """How an input is named in a prediction row."""
        return item if isinstance(item, str) else "<bytes>" if isinstance(item, bytes) else "<input>"

    @classmethod
    def openapi_content(cls, spec: dict, max_inputs: int) -> dict:
        """The request bodies this kind accepts, as OpenAPI content (media type -> schema): what /openapi.json
        promises for the served run, so a request the schema allows is one the server can read (max_inputs: the
        server's limit of inputs per request)."""
        return {"application/json": {"schema": {"type": "object", "required": [cls.json_key], "properties": {
            cls.json_key: {"type": "array", "minItems": 1, "maxItems": max_inputs, "items": cls.item_schema(spec)}}}}}

    @classmethod
    def item_schema(cls, spec: dict) -> dict:
        return {}


class ImageInput(InputKind):
    """Encoded images (PNG, JPEG, ...) -> float32 (C, S, S), resized and normalised as the run was trained."""

    name = "image"
    json_key = "images"
    body_types = ("image/", "application/octet-stream")
    multipart = True

    def __init__(self, spec: dict, run_dir: str | Path | None = None, max_pixels: int = MAX_PIXELS):
        self.channels, self.size = bounded(spec, "channels", 1, 4), bounded(spec, "size", 1, MAX_SIDE)
        self.mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
        if len(self.mean) != self.channels or len(self.std) != self.channels or not (self.std > 0).all():
            raise ValueError(f"the run's input spec has mean {spec['mean']} and std {spec['std']}; expected "
                             f"{self.channels} values each, std > 0")
        self.max_pixels = max_pixels

    def expand(self, items: list[str]) -> list[str]:
        """Files, and the files under folders (recursively, hidden ones left out)."""
        out: list[str] = []
        for item in items:
            p = Path(item)
            if p.is_dir():
                out += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
            else:
                out.append(item)
        return out

    def decode(self, raw: bytes | str) -> np.ndarray:
        """Encoded image bytes -> float32 (C, S, S), normalised like the training data."""
        if not isinstance(raw, bytes):
            raise InputError("expected image bytes, got text")
        try:
            arr = decode_image(raw, self.channels, self.size, self.max_pixels)
        except ImageError as err:
            raise InputError(str(err)) from None
        return (arr.astype(np.float32) / 255.0 - self.mean) / self.std

    def load(self, item: str | Path | bytes) -> np.ndarray:
        if isinstance(item, bytes):
            return self.decode(item)
        try:
            data = Path(item).read_bytes()
        except OSError as err:
            raise InputError(f"{item}: unreadable ({err.strerror})") from None
        try:
            return self.decode(data)
        except InputError as err:
            raise InputError(f"{item}: {err}") from None

    def from_json(self, value, where: str) -> bytes:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a base64 string, got {type(value).__name__}")
        if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
            value = value.split(",", 1)[1]
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: not valid base64") from None

    def example(self, n: int = 2) -> np.ndarray:
        return np.zeros((n, self.channels, self.size, self.size), dtype=np.float32)

    @classmethod
    def item_schema(cls, spec: dict) -> dict:
        return {"type": "string", "format": "byte", "minLength": 1, "description": "an encoded image, base64"}

    @classmethod
    def openapi_content(cls, spec: dict, max_inputs: int) -> dict:
        picture = {"type": "string", "format": "binary", "minLength": 1}
        return {"multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "array", "minItems": 1, "maxItems": max_inputs, "items": picture}}}},
                **super().openapi_content(spec, max_inputs), "image/png": {"schema": picture}}

    def synthetic(self, n: int = 16) -> list[np.ndarray]:
        # normalised pixels are roughly standard normal
        return list(np.random.default_rng(0).standard_normal((n, self.channels, self.size, self.size))
                    .astype(np.float32))


class TensorInput(InputKind):
    """Plain numbers: each input a nested list (JSON) of the spec's shape, e.g. a feature vector."""

    name = "tensor"

    def __init__(self, spec: dict, run_dir: str | Path | None = None):
        shape = spec.get("shape")
        if not isinstance(shape, list) or not shape:
            raise ValueError(f"the run's input spec has shape {shape!r}; expected a list of sizes")
        self.shape = tuple(bounded({"size": d}, "size", 1, MAX_ELEMENTS) for d in shape)
        if int(np.prod(self.shape)) > MAX_ELEMENTS:
            raise ValueError(f"the run's input spec has shape {list(self.shape)}: over {MAX_ELEMENTS} values")
        self.dtype = str(spec.get("dtype", "float32"))
        if self.dtype not in ("float32", "float64", "int64", "int32"):
            raise ValueError(f"the run's input spec has dtype {self.dtype!r}; expected float32, int64, ...")

    def decode(self, raw) -> np.ndarray:
        if isinstance(raw, bytes | str):
            try:
                raw = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError(f"expected a JSON array of shape {list(self.shape)}") from None
        try:
            arr = np.asarray(raw, dtype=self.dtype)
        except (TypeError, ValueError):
            raise InputError(f"expected numbers in an array of shape {list(self.shape)}") from None
        if arr.shape != self.shape:
            raise InputError(f"expected shape {list(self.shape)}, got {list(arr.shape)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError("NaN or infinite values")
        return arr

    def example(self, n: int = 2) -> np.ndarray:
        return np.zeros((n, *self.shape), dtype=self.dtype)

    @classmethod
    def item_schema(cls, spec: dict) -> dict:
        dtype = str(spec.get("dtype", "float32"))
        if dtype == "uint8":
            number = {"type": "integer", "minimum": 0, "maximum": 255}
        elif dtype.startswith("int"):
            number = {"type": "integer"}
        else:  # what float32 holds: a larger JSON number would become infinity, which is refused
            number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
        for size in reversed([int(d) for d in spec["shape"]]):
            number = {"type": "array", "minItems": size, "maxItems": size, "items": number}
        return number

    def synthetic(self, n: int = 16) -> list[np.ndarray]:
        return list(np.random.default_rng(0).standard_normal((n, *self.shape)).astype(self.dtype))


class ObservationInput(TensorInput):
    """An agent's observation (rl): a vector of floats, or stacked uint8 frames (C, H, W), as the environment gave
    it; the policy normalises it itself. JSON: {"observation": [...]} for one, {"observations": [[...], ...]}."""

    name = "observation"
    json_key = "observations"
    RECORDED = "observations.npy"  # real observations the run kept for the export's parity check
    MAX_RECORDED = 4096

    def __init__(self, spec: dict, run_dir: str | Path | None = None):
        super().__init__({**spec, "dtype": "float32"}, run_dir)
        self.dtype = str(spec.get("dtype", "float32"))
        if self.dtype not in ("float32", "uint8"):
            raise ValueError(f"the run's observation spec has dtype {self.dtype!r}; expected float32 or uint8")
        self.run_dir = Path(run_dir) if run_dir is not None else None

    @property
    def expected(self) -> str:
        return f"an observation of shape {list(self.shape)} ({self.dtype}{', 0-255' if self.dtype == 'uint8' else ''})"

    def read_json(self, data, max_inputs: int) -> list[tuple[str, object]]:
        if isinstance(data, dict) and "observation" in data:
            return [("observation", data["observation"])]
        if isinstance(data, dict) and isinstance(data.get("observations"), list) and data["observations"]:
            values = data["observations"]
            if len(values) > max_inputs:
                raise TooManyInputs(f"{len(values)} observations in one request; the limit is {max_inputs}")
            return [(f"observations[{i}]", v) for i, v in enumerate(values)]
        raise InputError(f"expected a JSON object {{\"observation\": [...]}} with {self.expected}, or "
                         "{\"observations\": [...]} with several")

    def decode(self, raw) -> np.ndarray:
        if isinstance(raw, bytes | str):
            try:
                raw = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError(f"expected {self.expected} as a JSON array") from None
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"expected numbers: {self.expected}") from None
        if arr.shape != self.shape:
            raise InputError(f"expected {self.expected}, got shape {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise InputError(f"NaN or infinite values; expected {self.expected}")
        if self.dtype == "uint8" and ((arr < 0) | (arr > 255) | (arr != np.round(arr))).any():
            raise InputError(f"expected whole numbers from 0 to 255: {self.expected}")
        if (np.abs(arr) > FLOAT32_MAX).any():  # would be infinity in float32
            raise InputError(f"values beyond float32's range (+-{FLOAT32_MAX:.4g}); expected {self.expected}")
        return arr.astype(self.dtype)

    def synthetic(self, n: int = 16) -> list[np.ndarray]:
        rng = np.random.default_rng(0)
        if self.dtype == "uint8":
            return list(rng.integers(0, 256, (n, *self.shape), dtype=np.uint8))
        return list(rng.standard_normal((n, *self.shape)).astype(np.float32))

    def parity_inputs(self, run_dir: str | Path) -> tuple[str, list[np.ndarray]]:
        p = Path(run_dir) / self.RECORDED
        if p.is_file():
            try:
                arr = np.load(p, allow_pickle=False)  # never unpickles
            except (OSError, ValueError):
                arr = None
            if arr is not None and arr.shape[1:] == self.shape and 0 < len(arr) <= self.MAX_RECORDED:
                return "recorded", list(arr.astype(self.dtype))
        return "synthetic", self.synthetic()


# name -> class, or "module:Class" for kinds whose module needs an optional package (text: tokenizers)
_KINDS: dict[str, type[InputKind] | str] = {"image": ImageInput, "tensor": TensorInput,
                                            "text": "nnforge.data.text_input:TextInput",
                                            "observation": ObservationInput,
                                            "latent": "nnforge.data.latent_input:LatentInput",
                                            "history": "nnforge.data.history_input:HistoryInput"}


def register_input_kind(name: str, cls: type[InputKind] | str) -> None:
    if name in _KINDS:
        raise ValueError(f"input kind '{name}' is registered twice")
    _KINDS[name] = cls


def input_kind(name: str) -> type[InputKind]:
    if name not in _KINDS:
        raise ValueError(f"unknown input kind {name!r} in the run's spec; known: {', '.join(sorted(_KINDS))}")
    cls = _KINDS[name]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = _KINDS[name] = getattr(importlib.import_module(module), attr)
    return cls


def build_input(spec: dict, run_dir: str | Path | None = None) -> InputKind:
    """The input kind named by spec["kind"], set up from the spec (and the run folder, e.g. its tokenizer)."""
    return input_kind(spec.get("kind", ""))(spec, run_dir)
