"""Checkpoint io: tensors in safetensors, everything else as JSON in the same file's header.

One file per checkpoint, so one atomic rename publishes it whole: we write to a temporary file in the same
folder, fsync it, rename it over the old one and fsync the folder. A crash at any point leaves either the old
checkpoint or the new one, never half of each. Loading parses the safetensors header and raw tensor bytes only;
nothing in the file is ever executed (no pickle). The header carries a SHA-256 of every tensor's bytes, checked at
load: a flipped byte in the weights is refused, not served.

    save_checkpoint(path, {"model.fc.weight": w, ...}, {"epoch": 3, "classes": [...]})
    tensors, meta = load_checkpoint(path)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

_META_KEY = "nnforge"
_SUM_KEY = "nnforge_sha256"  # of the tensors' names, dtypes, shapes and bytes, in name order


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not in nnforge's safe format."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteFailed(OSError):
    """A file could not be written (disk full, a size limit, permissions); the previous version is intact."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        old = "the previous version is intact" if path.exists() else "nothing was written"
        raise WriteFailed(err.errno, f"could not write {path} ({len(data) / 2**20:.1f} MiB): "
                                     f"{err.strerror or err}; {old}") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_checkpoint(path: str | Path | list, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Serialise once and write it atomically to `path` (or to each of a list of paths, e.g. last and best)."""
    # safetensors refuses shared or non-contiguous storage; a clone per tensor is cheap next to disk io.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(flat, metadata={_META_KEY: json.dumps(meta), _SUM_KEY: tensors_digest(flat)})
    for p in path if isinstance(path, list) else [path]:
        atomic_write_bytes(p, data)


def _looks_like_pickle(path: Path) -> bool:
    data = path.read_bytes()
    # protocol-2+ pickles start with 0x80; torch.save's zip archives with PK; protocols 0 and 1 open with a mark,
    # a global or a container opcode and end with the STOP opcode "."
    return data[:1] == b"\x80" or data[:2] == b"PK" or (data[:1] in (b"(", b"c", b"]", b"}", b")")
                                                          and data.rstrip()[-1:] == b".")


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        tensors = load_file(str(path), device=device)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        if _looks_like_pickle(path):
            raise CheckpointError(
                f"{path}: this is a pickle (torch.save) file; nnforge refuses to load pickles because "
                "unpickling can run arbitrary code. Re-save the tensors with safetensors."
            ) from None
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint ({err})") from None
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without nnforge metadata (not an nnforge checkpoint)")
    if _SUM_KEY in header and tensors_digest(tensors) != header[_SUM_KEY]:  # older checkpoints carry no sum
        raise CheckpointError(f"{path}: the tensor data does not match the checksum written with it: the file was "
                              "changed or damaged after it was saved; refusing to load it")
    return tensors, json.loads(header[_META_KEY])


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from .safetensors, or a .pth/.pt loaded with weights_only (tensors only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no weights file there")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError for anything outside the tensor allow-list
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors, and loading them could run code "
            f"({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return obj
