"""The nnforge command line: argument parsing and printing only; the work happens in nnforge.api.

    nnforge train image --data data/fashion-mnist --epochs 3
    nnforge evaluate runs/image/exp1
    nnforge predict runs/image/exp1 shoe.png some/folder --top-k 3 --output preds.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from nnforge.config import TRAIN_CONFIGS


def _add_config_options(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """One --flag per config field, with the field's docstring as help. Defaults stay in the config class."""
    for name, field in cls.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann)
        if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None -> X
            ann = next(a for a in args if a is not type(None))
            args = typing.get_args(ann)
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "null"
        help_ = f"{field.description or ''} (default: {default})"
        if ann is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(ann) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=list(args), default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, type=ann if ann in (int, float) else str, default=None,
                                help=help_, required=field.is_required() and name != "data")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnforge", description="From data to a deployed model, on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model; writes a run folder")
    tasks = train.add_subparsers(dest="task", required=True)
    for task, cls in TRAIN_CONFIGS.items():
        t = tasks.add_parser(task, help=cls.__doc__.splitlines()[0] if cls.__doc__ else task)
        t.add_argument("--config", help="YAML file of config values; command-line flags win")
        t.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
        _add_config_options(t, cls)

    ev = sub.add_parser("evaluate", help="classification report, confusion matrix, worst mistakes -> RUN/eval/")
    ev.add_argument("run")
    ev.add_argument("--data", help="labelled data to evaluate on (default: the run's own test split)")
    ev.add_argument("--device", default="auto")

    pr = sub.add_parser("predict", help="top-k labels with probabilities")
    pr.add_argument("run")
    pr.add_argument("inputs", nargs="+", help="image files/folders, or texts (@file reads one text per line)")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--output", help="write predictions to this .csv or .json file")
    pr.add_argument("--device", default="auto")

    lm = sub.add_parser("list-models", help="registered models")
    lm.add_argument("pattern", nargs="?", default="*")
    lm.add_argument("--family", choices=["image", "text"])
    return p


def _cmd_train(a) -> int:
    from nnforge import api

    overrides = {k: v for k, v in vars(a).items() if k not in ("command", "task", "config", "resume")}
    if a.resume is None and a.config is None and overrides.get("data") is None:
        raise ValueError("--data is required (or --config with a data key, or --resume RUN)")
    run = api.train(a.task, config=a.config, resume=a.resume, **overrides)
    print(run.path)
    return 0


def _cmd_evaluate(a) -> int:
    from nnforge import api

    report = api.evaluate(a.run, data=a.data, device=a.device)
    print(json.dumps({k: report[k] for k in ("accuracy", "top_k_accuracy", "macro_f1") if k in report}))
    return 0


def _write_predictions(rows: list[dict], bad: list[dict], path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({"predictions": rows, "errors": bad}, indent=2))
        return
    k = max((len(r["labels"]) for r in rows), default=0)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["input"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")] + ["error"])
        for r in rows:
            w.writerow([r["input"]] + [x for lab, pr in zip(r["labels"], r["probs"], strict=True)
                                       for x in (lab, f"{pr:.6f}")] + [""])
        for b in bad:
            w.writerow([b["input"]] + [""] * (2 * k) + [b["error"]])


def _cmd_predict(a) -> int:
    from nnforge import api
    from nnforge.tasks.classify import expand_inputs, predict_safely

    pred = api.load(a.run, device=a.device)
    inputs = expand_inputs(a.inputs, pred.spec["kind"])
    rows, bad = predict_safely(pred, inputs, a.top_k)
    for r in rows:
        top = "  ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probs"], strict=True))
        print(f"{r['input']}\t{top}")
    for b in bad:
        print(f"skipped {b['input']}: {b['error']}", file=sys.stderr)
    if a.output:
        _write_predictions(rows, bad, Path(a.output))
        print(f"wrote {a.output}", file=sys.stderr)
    return 0 if rows else 1


def _cmd_list_models(a) -> int:
    from nnforge.models import get_entry, list_models

    for name in list_models(a.pattern, a.family):
        e = get_entry(name)
        print(f"{name:24s} {e.family:6s} {e.doc}")
    return 0


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "list-models": _cmd_list_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnforge.engine.loop import TrainingDiverged, TrainingInterrupted

    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
