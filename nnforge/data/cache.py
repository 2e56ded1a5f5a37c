"""A bounded on-disk cache for decoded data and file checks, keyed by a fingerprint of the source files.

The fingerprint covers every file's path, size and modification time, so editing, adding or removing a file
gives a new key and the cache is rebuilt. Entries are written atomically; beyond `max_bytes` the least recently
used entries are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from nnforge.engine.checkpoint import atomic_write_bytes


def default_cache_dir() -> Path:
    return Path(os.environ.get("NNFORGE_CACHE") or Path.home() / ".cache" / "nnforge")


def fingerprint_files(paths: list[str], extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


class TensorCache:
    def __init__(self, root: str | Path | None = None, max_bytes: int = 4 << 30):
        self.root = Path(root) if root else default_cache_dir()
        self.max_bytes = max_bytes

    def path_of(self, key: str, suffix: str = ".safetensors") -> Path:
        return self.root / f"{key}{suffix}"

    def _touch(self, p: Path) -> None:
        try:
            os.utime(p)  # mtime doubles as "last used" for eviction
        except OSError:
            pass

    def get_json(self, key: str):
        p = self.path_of(key, ".json")
        if not p.is_file():
            return None
        self._touch(p)
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is a miss, rebuilt by the caller

    def put_json(self, key: str, obj) -> None:
        atomic_write_bytes(self.path_of(key, ".json"), json.dumps(obj).encode())
        self._evict()

    def get_tensor(self, key: str) -> torch.Tensor | None:
        p = self.path_of(key)
        if not p.is_file():
            return None
        self._touch(p)
        try:
            return load_file(str(p))["data"]
        except Exception:  # damaged entry: rebuild
            return None

    def put_tensor(self, key: str, t: torch.Tensor) -> None:
        if t.numel() * t.element_size() > self.max_bytes:
            return  # larger than the whole budget: keep it in memory only
        atomic_write_bytes(self.path_of(key), save({"data": t.contiguous()}))
        self._evict()

    def _evict(self) -> None:
        files = sorted((p for p in self.root.glob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_bytes:
            p = files.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
