"""The files `nnforge export` leaves in a run folder, and how to open them; no PyTorch needed.

    card = read_card("runs/image/exp1")                 # model.json: io (input/output kinds), opset, parity
    session = ort_session("runs/image/exp1/model.onnx")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MODEL_FILE, INT8_FILE, CARD_FILE = "model.onnx", "model.int8.onnx", "model.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(folder: str | Path) -> dict:
    p = Path(folder) / CARD_FILE
    try:
        card = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: missing; run `nnforge export {folder}` first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
    missing = [k for k in ("file",) + (() if "io" in card else ("spec", "classes")) if k not in card]
    if missing:
        raise ValueError(f"{p}: missing keys {missing}; re-run `nnforge export {folder}`")
    name = card["file"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{p}: \"file\" must name a file in the run folder itself, got {name!r}")
    return card


def card_io(card: dict) -> dict:
    """The exported model's inputs and outputs by kind; cards written before tasks held a classifier's spec."""
    if "io" in card:
        return card["io"]
    return {"verb": "predict", "input": card["spec"], "output": {"kind": "probs", "classes": card["classes"]}}


def run_io(folder: str | Path) -> dict | None:
    """What RUN's model takes and returns (its io), read without loading it: from model.json, else from the best
    checkpoint's header (no tensors read, no PyTorch needed); None when neither can be read."""
    folder = Path(folder)
    try:
        return card_io(read_card(folder))
    except (FileNotFoundError, ValueError, KeyError):
        pass
    try:
        import safetensors

        with safetensors.safe_open(str(folder / "checkpoints" / "best.safetensors"), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("nnforge", "{}"))
    except Exception:  # noqa: BLE001 - an unreadable run is the loader's to report, with its own message
        return None
    if "io" in meta:
        return meta["io"]
    if "spec" in meta and "classes" in meta:
        return {"verb": "predict", "input": meta["spec"], "output": {"kind": "probs", "classes": meta["classes"]}}
    return None


def ort_session(path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session; threads: intra-op threads (0 = one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Idle pool threads would otherwise spin for a while after each run: on a server that burns the core the
    # event loop needs to parse the next requests, and buys nothing when batches come a few ms apart.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only; the default prints warnings nobody can act on
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
