"""The latent input kind: what a generator takes. One float32 row per sample: the noise z, and for a conditional
generator the class index in one more column.

    pre = build_input({"kind": "latent", "z_dim": 128, "classes": ["bag", "shoe"]})
    rows = pre.sample(8, class_name="shoe", seed=7)        # the same 8 rows for the same seed, in any process
    pre.read_json({"n": 8, "class": "shoe", "seed": 7}, max_inputs=64)   # a /v1/generate request body

Noise is drawn with numpy (np.random.default_rng(seed)), so PyTorch and the ONNX Runtime server, which imports no
torch, make the same samples from the same seed. A request without a seed gets a fresh one, named in every answer
row (`seed=123/0`), so any sample can be made again.
"""

from __future__ import annotations

import numpy as np

from nnforge.data.inputs import InputError, InputKind, TooManyInputs, bounded, whole

MAX_SEED = 2**32 - 1  # what numpy's seeding takes without surprise, and what a JSON client can send exactly
REQUEST_KEYS = ("n", "seed", "class", "z")


class LatentInput(InputKind):
    name = "latent"
    json_key = "z"

    def __init__(self, spec: dict, run_dir=None):
        self.z_dim = bounded(spec, "z_dim", 1, 65536)
        classes = spec.get("classes") or []
        if not isinstance(classes, list):
            raise ValueError(f"the run's input spec has classes {classes!r}; expected a list of names")
        self.classes = [str(c) for c in classes]  # empty: an unconditional generator
        self.width = self.z_dim + (1 if self.classes else 0)

    # ---- making inputs ----
    def class_index(self, name) -> int:
        """A class name -> its index; InputError naming the classes when it is not one of them."""
        if not self.classes:
            raise InputError("this generator is unconditional: it takes no class")
        if str(name) not in self.classes:
            raise InputError(f"unknown class {str(name)!r}; this generator's classes: {', '.join(self.classes)}")
        return self.classes.index(str(name))

    def sample(self, n: int, class_name: str | None = None, seed: int | None = None) -> list[np.ndarray]:
        """n latent rows from `seed`: for a conditional generator all of class_name, or (None) the classes in turn."""
        seed = check_seed(seed)
        z = np.random.default_rng(seed).standard_normal((n, self.z_dim), dtype=np.float32)
        if self.classes:
            idx = np.full(n, self.class_index(class_name)) if class_name is not None else np.arange(n) % len(
                self.classes)
            z = np.concatenate([z, idx[:, None].astype(np.float32)], 1)
        elif class_name is not None:
            self.class_index(class_name)  # raises: unconditional
        return list(z)

    # ---- reading inputs ----
    def decode(self, raw) -> np.ndarray:
        """One latent row (a list or array of z_dim [+ 1] numbers) -> float32 (width,), checked."""
        try:
            arr = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"expected {self.width} numbers (z{' and a class index' if self.classes else ''})") \
                from None
        if arr.shape != (self.width,):
            raise InputError(f"expected {self.width} numbers per latent row, got shape {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise InputError("NaN or infinite values in a latent row")
        if self.classes:
            c = arr[-1]
            if c != int(c) or not 0 <= c < len(self.classes):
                raise InputError(f"class index {c:g} in the last column: expected a whole number from 0 to "
                                 f"{len(self.classes) - 1}")
        return arr

    def read_json(self, data, max_inputs: int) -> list[tuple[str, np.ndarray]]:
        """{"n": 8, "seed": 7, "class": "sneaker"} (all optional: n 1, a fresh seed, the classes in turn), or
        {"z": [[...], ...]} with explicit latent rows."""
        if not isinstance(data, dict):
            raise InputError('expected a JSON object such as {"n": 8, "seed": 7}')
        unknown = sorted(set(data) - set(REQUEST_KEYS))
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(unknown)}; a generator takes {', '.join(REQUEST_KEYS)}")
        if "z" in data:
            if len(data) > 1:
                raise InputError('"z" gives the latent rows themselves: send it without n, seed or class')
            return super().read_json(data, max_inputs)
        n = whole(data.get("n", 1))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f'"n" must be a whole number >= 1, got {n!r}')
        if n > max_inputs:
            raise TooManyInputs(f"n={n} samples in one request; the limit is {max_inputs}")
        seed = whole(data.get("seed"))
        seed = fresh_seed() if seed is None else check_seed(seed)
        cls = data.get("class")
        rows = self.sample(n, None if cls is None else str(cls), seed)
        prefix = f"{cls}/" if cls is not None else ""
        return [(f"{prefix}seed={seed}/{i}", row) for i, row in enumerate(rows)]

    def example(self, n: int = 2) -> np.ndarray:
        return np.stack(self.sample(n, seed=0))

    @classmethod
    def openapi_content(cls, spec: dict, max_inputs: int) -> dict:
        """Either {"n", "seed", "class"} (all optional) or {"z": rows}; a conditional generator's rows end with the
        class index (prefixItems: z_dim numbers, then a whole number below the class count)."""
        z_dim, classes = int(spec["z_dim"]), [str(c) for c in spec.get("classes") or []]
        # a bound the JSON number must keep to stay finite in float32 (the server refuses infinities)
        number = {"type": "number", "minimum": -1e30, "maximum": 1e30}
        row = {"type": "array", "items": number, "minItems": z_dim, "maxItems": z_dim}
        if classes:
            row = {"type": "array", "prefixItems": [number] * z_dim + [
                {"type": "integer", "minimum": 0, "maximum": len(classes) - 1}], "items": False,
                "minItems": z_dim + 1, "maxItems": z_dim + 1}
        drawn = {"n": {"type": "integer", "minimum": 1, "maximum": max_inputs, "description": "samples (default 1)"},
                 "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED,
                          "description": "the same seed makes the same samples (default: a fresh one, named)"}}
        if classes:
            drawn["class"] = {"enum": classes, "description": "the class to draw (default: the classes in turn)"}
        schema = {"oneOf": [
            {"type": "object", "additionalProperties": False, "properties": drawn},
            {"type": "object", "additionalProperties": False, "required": ["z"], "properties": {
                "z": {"type": "array", "minItems": 1, "maxItems": max_inputs, "items": row,
                      "description": "the latent rows themselves"}}}]}
        return {"application/json": {"schema": schema}}

    def synthetic(self, n: int = 16) -> list[np.ndarray]:
        return self.sample(n, seed=0)

    def describe(self, item) -> str:
        return "<latent>"


def fresh_seed() -> int:
    """A seed from the operating system's entropy, for a request that gave none (it is named in the answer)."""
    return int(np.random.SeedSequence().entropy % (MAX_SEED + 1))


def check_seed(seed) -> int | None:
    """A seed as given (None, or a whole number from 0 to MAX_SEED), or InputError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
        raise InputError(f'"seed" must be a whole number from 0 to {MAX_SEED}, got {seed!r}')
    return int(seed)
