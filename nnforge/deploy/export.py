"""ONNX export with a parity check: a run's model in one file that ONNX Runtime can serve without PyTorch.

    nnforge export runs/image/exp1 --format onnx [--opset 18] [--quantize int8]
    report = export_onnx("runs/image/exp1", quantize="int8")

writes RUN/model.onnx (the input kind's dynamic axes: the batch, and for text the sequence) and RUN/model.json
(the run's io: input and output kinds, e.g. class names; opset, parity figures), and RUN/model.int8.onnx with
--quantize int8. Any task's run exports the same way: the model comes from `nnforge.load`, is traced on its input
kind's example batch and checked on the run's held-out items (or synthetic inputs), through the same input kind
that `predict` and `serve` use. A model whose outputs drift past the tolerance is not kept. A run may declare more
entry points of its model in io "graphs" (a recommender's item tower): each becomes RUN/<name>.onnx, checked the
same way, and is listed in model.json.

Exporter: torch.export (`dynamo=True`) first. The legacy TorchScript tracer is faster but bakes shapes into
attention reshapes (a TransformerEncoder exported with a dynamic sequence axis fails at other lengths), and it is
deprecated; it remains the fallback for models torch.export cannot capture. Parity decides either way.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from nnforge.data.inputs import InputError
from nnforge.deploy.artifacts import CARD_FILE, INT8_FILE, MODEL_FILE, ort_session, sha256_file
from nnforge.engine.checkpoint import atomic_write_bytes
from nnforge.engine.run import Run, versions
from nnforge.inference import Loaded

TOLERANCE = 1e-3      # largest |output difference| allowed, relative to max(1, largest |output|)
MIN_AGREEMENT = 0.99  # top-1 agreement; below 1.0 only so that exact ties cannot fail a sound export
PARITY_LIMIT = 256    # held-out items PyTorch and ONNX Runtime both run: enough to see drift, quick to run
INT8_EVAL_LIMIT = 2000  # held-out items the int8 model's accuracy is measured on (ONNX Runtime only)


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not match PyTorch."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trace_example(pre) -> np.ndarray:
    """The input kind's dummy batch, with every dynamic axis at least 2 long (a size-1 axis gets specialised)."""
    x = pre.example(2)
    for axis in pre.dynamic_axes:
        if x.shape[axis] < 2:
            x = np.concatenate([x] * 2, axis=axis)
    return x


def held_out(run: Run, pre, limit: int = PARITY_LIMIT) -> tuple[str, list[np.ndarray], list[str]]:
    """(split name, preprocessed inputs, their labels) from the run's test split, else val, else train."""
    try:
        splits = run.read_json("split.json")
    except FileNotFoundError:
        splits = {}
    for name in ("test", "val", "train"):
        arrays, labels = [], []
        for item, label in splits.get(name, []):
            try:
                arrays.append(pre.load(item))
                labels.append(label)
            except InputError:
                continue  # a file that went missing since training; the rest still check parity
            if len(arrays) == limit:
                break
        if arrays:
            return name, arrays, labels
    return "", [], []


def _batches(pre, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Batches of sizes 1, 3, 32, 32, ...: other sizes (and for text, other lengths) than the trace saw."""
    out, i, sizes = [], 0, iter([1, 3])
    while i < len(arrays):
        n = next(sizes, 32)
        out.append(pre.batch(arrays[i:i + n]))
        i += n
    return out


def _export_graph(model: torch.nn.Module, example: torch.Tensor, axes: dict[int, str], output_name: str, path: Path,
                  opset: int | None, exporter: str) -> str:
    """Write the ONNX graph to `path`; returns the exporter that worked ("dynamo" or "torchscript")."""
    names = {"input_names": ["input"], "output_names": [output_name]}
    errors = []
    for name in (["dynamo", "torchscript"] if exporter == "auto" else [exporter]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation and tracer chatter; parity below is the real check
                if name == "dynamo":
                    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(axes,),
                                                opset_version=opset, verbose=False, **names)
                    program.save(str(path), external_data=False)  # one self-contained file
                else:
                    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset or 17,
                                      dynamic_axes={"input": axes, output_name: {0: "batch"}}, **names)
            return name
        except Exception as err:  # exporters raise many types; we report each and try the next one
            errors.append(f"{name}: {type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
            _log(f"export: the {name} exporter failed ({errors[-1]})")
    raise ExportError("no exporter could capture the model:\n  " + "\n  ".join(errors))


def parity(model: torch.nn.Module, session, batches: list[np.ndarray], output) -> dict:
    """Largest |output difference| of ONNX Runtime against PyTorch on the same inputs, and how often they give the
    same answer (top-1 agreement for classifiers; None where the output kind has no discrete answer)."""
    diff, agree, scale, n = 0.0, 0.0, 1.0, 0
    for x in batches:
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).float().numpy()
        got = session.run(None, {"input": x})[0]
        diff = max(diff, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        same = output.agreement(got, ref)
        agree = None if same is None else agree + same * len(x)
        n += len(x)
    return {"items": n, "max_abs_diff": diff, "logit_scale": scale,
            "top1_agreement": None if agree is None else agree / max(1, n)}


def accuracy(session, batches: list[np.ndarray], labels: list[int]) -> float:
    preds = np.concatenate([session.run(None, {"input": x})[0].argmax(1) for x in batches])
    return float((preds == np.asarray(labels)).mean())


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: weights stored as int8, activations quantised per batch at run time (no calibration data)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger about optional pre-processing
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def export_onnx(run_path: str | Path, opset: int | None = None, quantize: str | None = None,
                tolerance: float = TOLERANCE, exporter: str = "auto", which: str = "best") -> dict:
    """Export RUN's model to RUN/model.onnx, check it against PyTorch, describe it in RUN/model.json.

    Returns the model card written to model.json. Raises ExportError (and keeps no model.onnx from this
    attempt) when ONNX Runtime disagrees with PyTorch beyond `tolerance`.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize!r}: expected int8")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter {exporter!r}: expected auto, dynamo or torchscript")
    run = Run(run_path)
    loaded = Loaded(run.path, which=which, device="cpu")
    model, pre, output = loaded.model.float().eval(), loaded.input, loaded.output
    output_name = "logits" if output.name == "probs" else "output"
    final, tmp = run.path / MODEL_FILE, run.path / f".{MODEL_FILE}.tmp"

    t0 = time.perf_counter()
    try:
        import onnx

        example = trace_example(pre)
        used = _export_graph(model, torch.from_numpy(example), pre.dynamic_axes, output_name, tmp, opset, exporter)
        export_s = time.perf_counter() - t0
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        real_opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
        session = ort_session(tmp)
        split, arrays, labels = held_out(run, pre, INT8_EVAL_LIMIT if quantize else PARITY_LIMIT)
        if not arrays:  # no split record (a policy, a run copied by hand): recorded or synthetic inputs
            split, arrays = pre.parity_inputs(run.path)
            _log(f"export: no held-out items in split.json; checking parity on {split} inputs")
        check = parity(model, session, _batches(pre, arrays[:PARITY_LIMIT]), output)
        check.update(split=split, tolerance=tolerance, min_agreement=MIN_AGREEMENT)
        bound = tolerance * check["logit_scale"]
        agreement = check["top1_agreement"]
        if check["max_abs_diff"] > bound or (agreement is not None and agreement < MIN_AGREEMENT):
            agreed = ("" if agreement is None else
                      f", {output.agreement_name} {agreement:.2%} (needed {MIN_AGREEMENT:.0%})")
            raise ExportError(
                f"{run.path}: ONNX Runtime disagrees with PyTorch on {check['items']} {split} items: largest "
                f"|output difference| {check['max_abs_diff']:.3g} (allowed {bound:.3g}){agreed}; exporter "
                f"{used}, opset {real_opset}. model.onnx was not written; try another --opset, or report the model")
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    agreed = "" if agreement is None else f", {output.agreement_name} {agreement:.2%}"
    _log(f"export: {final} ({final.stat().st_size / 1e6:.2f} MB, {used} exporter, opset {real_opset}, "
         f"{export_s:.1f}s); parity on {check['items']} {split} items: max |diff| {check['max_abs_diff']:.2e}"
         f"{agreed}")

    out_shape = loaded.forward(pre.batch(list(example))).shape
    card = {
        "format": "onnx", "file": MODEL_FILE, "model": loaded.name, "task": loaded.meta.get("task"),
        "io": loaded.io, "opset": real_opset, "exporter": used,
        "input": {"name": "input", "dtype": str(example.dtype),
                  "shape": [pre.dynamic_axes.get(i, int(d)) for i, d in enumerate(example.shape)]},
        "output": {"name": output_name, "dtype": "float32", "shape": ["batch", *out_shape[1:]]},
        "parity": check, "sha256": sha256_file(final),
        # the checkpoint this file came from: the server notices a stale export after re-training
        "source": {"checkpoint": f"checkpoints/{which}.safetensors",
                   "sha256": sha256_file(run.checkpoint(which))},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(),
    }
    if quantize == "int8":
        card["int8"] = _quantize_and_compare(run.path, session, _batches(pre, arrays), labels, loaded, split)
    elif (run.path / INT8_FILE).exists():  # made from an older model.onnx: it would no longer match the card
        (run.path / INT8_FILE).unlink()
        _log(f"export: removed the stale {run.path / INT8_FILE} (pass --quantize int8 to make a new one)")
    graphs = loaded.io.get("graphs") or {}
    if graphs:
        card["graphs"] = {name: export_entry(run, loaded.model, name, spec, opset, exporter, tolerance)
                          for name, spec in graphs.items()}
    atomic_write_bytes(run.path / CARD_FILE, json.dumps(card, indent=2).encode())
    _track(run, [final, run.path / CARD_FILE])
    return card


def _track(run: Run, files: list[Path]) -> None:
    """The export joins the run's MLflow / W&B runs (meta.json "tracking"), when it was trained with --track."""
    from nnforge.engine.tracking import reopen

    try:
        meta = run.read_json("meta.json")
    except FileNotFoundError:
        return
    for t in reopen(meta, run.path):
        t.artifacts(files)
        t.close()


def _quantize_and_compare(folder: Path, fp32_session, batches, labels, loaded: Loaded, split) -> dict:
    dst = folder / INT8_FILE
    quantize_int8(folder / MODEL_FILE, dst)
    int8 = ort_session(dst)
    out = {"file": INT8_FILE, "sha256": sha256_file(dst), "mb": dst.stat().st_size / 1e6,
           "fp32_mb": (folder / MODEL_FILE).stat().st_size / 1e6, "split": split}
    agree = parity_onnx(fp32_session, int8, batches)
    out["top1_agreement_with_fp32"] = agree
    classes = loaded.classes
    if labels and split in ("test", "val") and classes:
        index = {c: i for i, c in enumerate(classes)}
        y = [index[c] for c in labels]
        out["accuracy_fp32"], out["accuracy_int8"] = accuracy(fp32_session, batches, y), accuracy(int8, batches, y)
        out["accuracy_change"], out["items"] = out["accuracy_int8"] - out["accuracy_fp32"], len(y)
        _log(f"export: {dst} ({out['mb']:.2f} MB vs {out['fp32_mb']:.2f} MB); {split} accuracy "
             f"{out['accuracy_fp32']:.4f} -> {out['accuracy_int8']:.4f} ({out['accuracy_change']:+.4f}) "
             f"on {len(y)} items; top-1 agreement with fp32 {agree:.2%}")
    else:
        _log(f"export: {dst} ({out['mb']:.2f} MB); no labelled held-out split to measure accuracy on; "
             f"top-1 agreement with fp32 {agree:.2%}")
    return out


class _Entry(torch.nn.Module):
    """One more entry point of a model as a module of its own, for the exporter."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


def export_entry(run: Run, model: torch.nn.Module, name: str, spec: dict, opset: int | None, exporter: str,
                 tolerance: float) -> dict:
    """A further entry point the run declares in its io "graphs" (a recommender's item tower: text embedding ->
    item vector) -> RUN/<name>.onnx, traced on its own input kind and checked for parity like model.onnx."""
    from nnforge.data.inputs import build_input
    from nnforge.outputs import build_output

    method = spec.get("method")
    if not (isinstance(name, str) and name.isidentifier() and isinstance(method, str) and not method.startswith("_")
            and callable(type(model).__dict__.get(method))):  # the run is data: only the model class's own methods
        raise ExportError(f"{run.path}: io graph {name!r} names {method!r}, not a method of {type(model).__name__}")
    entry = _Entry(model, method).eval()
    pre = build_input(spec["input"], run.path)
    final, tmp = run.path / f"{name}.onnx", run.path / f".{name}.onnx.tmp"
    try:
        used = _export_graph(entry, torch.from_numpy(trace_example(pre)), pre.dynamic_axes, "output", tmp, opset,
                             exporter)
        check = parity(entry, ort_session(tmp), _batches(pre, pre.synthetic(64)), build_output(spec["output"]))
        if check["max_abs_diff"] > tolerance * check["logit_scale"]:
            raise ExportError(f"{run.path}: {name}.onnx disagrees with PyTorch by {check['max_abs_diff']:.3g} "
                              f"(allowed {tolerance * check['logit_scale']:.3g}); it was not written")
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    _log(f"export: {final} ({method}, {used} exporter); parity on {check['items']} synthetic inputs: max |diff| "
         f"{check['max_abs_diff']:.2e}")
    return {"file": final.name, "method": method, "input": spec["input"], "output": spec["output"],
            "exporter": used, "parity": check, "sha256": sha256_file(final)}


def parity_onnx(a, b, batches: list[np.ndarray]) -> float:
    """Top-1 agreement between two ONNX sessions."""
    same = sum(int((a.run(None, {"input": x})[0].argmax(1) == b.run(None, {"input": x})[0].argmax(1)).sum())
               for x in batches)
    return same / max(1, sum(len(x) for x in batches))
