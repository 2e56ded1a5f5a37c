"""The text input kind: a text -> token ids with the run's own tokenizer (tokenizer.json in the run folder).

    pre = build_input({"kind": "text", "max_len": 128, "pad_id": 0, ...}, "runs/text/exp1")
    ids = pre.batch([pre.load("a text"), pre.load("another one")])     # int64 (2, T), padded on the right
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnforge.data.inputs import MAX_TOKENS, InputError, InputKind, bounded
from nnforge.data.tokenizer import load_tokenizer, pad_batch

TOKENIZER_FILE = "tokenizer.json"


class TextInput(InputKind):
    name = "text"
    dtype = "int64"
    dynamic_axes = {0: "batch", 1: "seq"}  # (B, T) token ids, padded to the longest text of the batch
    json_key = "texts"
    body_types = ("text/plain",)

    def __init__(self, spec: dict, run_dir: str | Path | None):
        if run_dir is None:
            raise ValueError("a text run's preprocessor needs the run folder (its tokenizer.json lives there)")
        self.max_len = bounded(spec, "max_len", 1, MAX_TOKENS)
        self.pad_id = bounded({"pad_id": spec.get("pad_id", 0)}, "pad_id", 0, 10_000_000)
        self.tokenizer = load_tokenizer(Path(run_dir) / spec.get("tokenizer", TOKENIZER_FILE), self.max_len)

    def expand(self, items: list[str]) -> list[str]:
        """Texts as given; @FILE reads one text per line."""
        out: list[str] = []
        for item in items:
            if item.startswith("@"):
                out += [line.rstrip("\n") for line in Path(item[1:]).read_text(encoding="utf-8").splitlines() if line]
            else:
                out.append(item)
        return out

    def decode(self, raw: str | bytes) -> np.ndarray:
        """A text (or its UTF-8 bytes) -> int64 token ids (T,), T <= max_len."""
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"text is not valid UTF-8 (bad byte at offset {err.start})") from None
        if not isinstance(raw, str):
            raise InputError(f"expected a text, got {type(raw).__name__}")
        if not raw.strip():
            raise InputError("empty text")
        ids = self.tokenizer.encode(raw).ids
        if not ids:
            raise InputError("the text gives no tokens")
        return np.asarray(ids, dtype=np.int64)

    @classmethod
    def item_schema(cls, spec: dict) -> dict:
        return {"type": "string", "pattern": r"\S", "description": "a text (at least one character that is not space)"}

    @classmethod
    def openapi_content(cls, spec: dict, max_inputs: int) -> dict:
        return {**super().openapi_content(spec, max_inputs), "text/plain": {"schema": cls.item_schema(spec)}}

    def from_json(self, value, where: str) -> str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {type(value).__name__}")
        return value

    def batch(self, arrays: list[np.ndarray]) -> np.ndarray:
        return pad_batch(arrays, self.pad_id)

    def example(self, n: int = 2) -> np.ndarray:
        """A batch of real token ids (export tracing): (n, T) with T != n, so the two axes cannot be confused."""
        ids = self.decode("an example sentence, long enough to trace the model with a real sequence of tokens")
        if len(ids) == n:
            ids = ids[:-1]
        return np.tile(ids, (n, 1))

    def synthetic(self, n: int = 16) -> list[np.ndarray]:
        return list(self.example(n))  # token ids: only the tokenizer knows which values are valid
