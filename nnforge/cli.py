"""The nnforge command line: argument parsing and printing only; the work happens in nnforge.api.

    nnforge train image --data data/fashion-mnist --epochs 3
    nnforge evaluate runs/image/exp1
    nnforge predict runs/image/exp1 shoe.png some/folder --top-k 3 --output preds.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel, BeforeValidator

from nnforge.cli_loop import LOOP_COMMANDS, add_loop_commands
from nnforge.tasks import train_targets


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
        if typing.get_origin(ann) is tuple:
            parser.add_argument(flag, dest=name, type=_numbers, default=None, metavar="X,Y", help=help_)
        elif typing.get_origin(ann) is dict:
            parser.add_argument(flag, dest=name, type=_key_values, default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                                help=help_)
        elif ann is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(ann) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=list(args), default=None, help=help_)
        else:
            # a field with its own parser (steps: 200k, 1M) gets the text as typed; pydantic reads it
            own = any(isinstance(m, BeforeValidator) for m in field.metadata)
            parser.add_argument(flag, dest=name, type=ann if ann in (int, float) and not own else str,
                                default=None, help=help_,
                                required=field.is_required() and name not in ("data", "env"))


def _numbers(text: str) -> tuple[float, ...]:
    """'0.5,0.999' -> (0.5, 0.999)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def _key_values(text: str) -> dict:
    """'width=32,dropout=0.2' -> {'width': 32, 'dropout': 0.2}; values are read as YAML scalars."""
    import re

    import yaml

    out = {}
    for part in filter(None, re.split(r",(?=\s*\w+=)", text)):  # commas inside values (widths=[3,5]) stay
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got '{part}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnforge", description="From data to a deployed model, on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model; writes a run folder")
    tasks = train.add_subparsers(dest="task", required=True)
    targets = train_targets()
    for task, (_, cls) in targets.items():
        t = tasks.add_parser(task, help=cls.__doc__.splitlines()[0] if cls.__doc__ else task)
        t.add_argument("--config", help="YAML file of config values; command-line flags win")
        t.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
        t.add_argument("--nproc", type=int, help="train on N processes of this machine (torchrun + DDP; the batch "
                                                 "size stays the global batch); torchrun itself for several machines")
        _add_config_options(t, cls)

    tune = sub.add_parser("tune", help="hyper-parameter search (Optuna): each trial a run; the study in an RDB")
    tune_tasks = tune.add_subparsers(dest="task", required=True)
    for task, (_, cls) in targets.items():
        t = tune_tasks.add_parser(task, help=f"search {task} configs; every train option sets the base config",
                                  conflict_handler="resolve")
        t.add_argument("--config", help="YAML file of the base config; command-line flags win")
        _add_config_options(t, cls)
        t.add_argument("--space", required=True, help="YAML: config key -> {type: float|int|categorical, low, "
                                                      "high, log, step, choices}")
        t.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (all workers)")
        t.add_argument("--storage", help="Optuna RDB URL (default: sqlite file in runs/tune/<study>)")
        t.add_argument("--study", help="study name (default: <task>-<data name>); the same name continues it")
        t.add_argument("--timeout", help="stop starting trials after this long: 600, 30m, 1h")
        t.add_argument("--metric", help="logged metric to optimise (default: the config's monitor)")
        t.add_argument("--pruner", choices=["median", "hyperband"], default="median")

    ev = sub.add_parser("evaluate", help="the run's task evaluates it -> RUN/eval/ and RUN/report.html")
    ev.add_argument("run")
    ev.add_argument("--data", help="labelled data to evaluate on (default: the run's own test split)")
    ev.add_argument("--features", metavar="RUN", help="GAN runs: the nnforge image classifier whose features FID "
                                                      "uses (default: the one the run trained or was given)")
    ev.add_argument("--episodes", type=int, help="rl runs: deterministic episodes to play (default 20)")
    ev.add_argument("--device", default="auto")

    pl = sub.add_parser("play", help="rl runs: render one episode of the policy to an animated GIF")
    pl.add_argument("run")
    pl.add_argument("--out", help="GIF file to write (default: RUN/eval/episode.gif)")
    pl.add_argument("--seed", type=int, help="reset seed of the episode (default: the first evaluation episode's)")
    pl.add_argument("--max-steps", type=int, help="stop the episode after this many steps")
    pl.add_argument("--device", default="auto")

    gn = sub.add_parser("generate", help="new images from a generator run (nnforge train gan): a grid or files")
    gn.add_argument("run")
    gn.add_argument("--n", type=int, default=64, help="how many images")
    gn.add_argument("--class", dest="class_name", help="conditional generators: the class to make (default: each "
                                                       "class in turn)")
    gn.add_argument("--seed", type=int, help="the same seed makes the same images (default: a fresh one, printed)")
    where = gn.add_mutually_exclusive_group()
    where.add_argument("--out", help="one grid PNG (default: RUN/samples/generated_seed<SEED>.png)")
    where.add_argument("--out-dir", help="a folder for one PNG per image")
    gn.add_argument("--force", action="store_true", help="replace existing files")
    gn.add_argument("--device", default="auto")

    rc = sub.add_parser("recommend", help="ranked items from a recommender run: for a user, a history, or like an "
                                          "item")
    rc.add_argument("run")
    asked = rc.add_mutually_exclusive_group(required=True)
    asked.add_argument("--user", help="a user id (an unknown user gets the popular items, flagged as such)")
    asked.add_argument("--item", help="an item id: more like this")
    asked.add_argument("--history", help="comma-separated item ids the user interacted with, oldest first")
    rc.add_argument("--k", type=int, default=10, help="how many items")
    rc.add_argument("--exclude-seen", action="store_true", help="leave out the items the user already has")
    rc.add_argument("--json", action="store_true", help="print the answer as JSON")
    rc.add_argument("--device", default="auto")

    ai = sub.add_parser("add-items", help="add items to a recommender run's index without retraining (their text "
                                          "is embedded)")
    ai.add_argument("run")
    ai.add_argument("items", help="CSV/TSV file: an item id column and text columns")
    ai.add_argument("--item-col", help="the id column (default: one named item, item_id, movieId, ...)")
    ai.add_argument("--item-text-cols", help="comma-separated text columns (default: every column but the id)")
    ai.add_argument("--item-title-col", help="the title column (default: one named like title or name)")
    ai.add_argument("--device", default="auto")

    pr = sub.add_parser("predict", help="answers for inputs (classifiers: top-k labels with probabilities)")
    pr.add_argument("run")
    pr.add_argument("inputs", nargs="+", help="image files/folders, or texts (@file reads one text per line)")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--output", help="write predictions to this .csv or .json file (a new file unless --force)")
    pr.add_argument("--force", action="store_true", help="replace an existing --output file")
    pr.add_argument("--device", default="auto")

    ex = sub.add_parser("export", help="RUN/model.onnx with a parity check against PyTorch")
    ex.add_argument("run")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    ex.add_argument("--quantize", choices=["int8"], help="also write RUN/model.int8.onnx (dynamic int8)")
    ex.add_argument("--tolerance", type=float, default=1e-3,
                    help="largest |logit difference| allowed, relative to max(1, largest |logit|)")
    ex.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                    help="auto tries torch.export (dynamo) first, then the TorchScript tracer")

    from nnforge.deploy.settings import serve_defaults  # a light module: defaults live in one place

    d = serve_defaults()
    sv = sub.add_parser("serve", help="HTTP API: micro-batching, /health /ready /metrics /v1/predict",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sv.add_argument("run", help="run folder (served with ONNX Runtime when it holds model.onnx), or a registered "
                                "model: NAME@champion or NAME@challenger (followed as the alias moves), NAME@VERSION")
    sv.add_argument("--registry", help="SQLAlchemy URL of the registry store that NAME@ALIAS is looked up in "
                                       "(default: $NNFORGE_REGISTRY, else runs/registry.db)")
    sv.add_argument("--host", default=d["host"], help="any non-loopback address needs a token")
    sv.add_argument("--port", type=int, default=d["port"], help="TCP port")
    sv.add_argument("--workers", type=int, default=d["workers"],
                    help="server processes, each with its own model; /metrics counts them all")
    sv.add_argument("--token", help="bearer token, needed on every path but /health; None: $NNFORGE_TOKEN")
    sv.add_argument("--allow-reload", action="store_true",
                    help="without a token, POST /v1/reload is refused (403), since anyone who can reach the port "
                         "could swap the model; this allows it. With a token, reload needs the token")
    sv.add_argument("--reload-root", help="reloads may load runs under this folder only (default: the folder "
                                          "holding RUN)")
    sv.add_argument("--allowed-hosts", type=lambda t: tuple(h for h in t.split(",") if h), default=(),
                    metavar="NAME[,NAME]", help="Host header names to answer besides the bound address (and, on "
                                                "loopback, localhost): the names a reverse proxy forwards")
    sv.add_argument("--backend", choices=["auto", "onnx", "torch"], default=d["backend"],
                    help="auto: ONNX Runtime when RUN/model.onnx exists, else PyTorch")
    sv.add_argument("--int8", action="store_true", help="serve RUN/model.int8.onnx")
    sv.add_argument("--device", default=d["device"], help="PyTorch backend only")
    sv.add_argument("--max-batch-size", type=int, default=d["max_batch_size"], help="inputs per forward pass")
    sv.add_argument("--max-wait-ms", type=float, default=d["max_wait_ms"], help="how long a batch waits to fill")
    sv.add_argument("--max-queue", type=int, default=d["max_queue"], help="inputs waiting; beyond: 503")
    sv.add_argument("--timeout", dest="timeout_s", type=float, default=d["timeout_s"], help="seconds per request")
    sv.add_argument("--max-body-mb", type=float, default=d["max_body_mb"], help="larger bodies get 413")
    sv.add_argument("--max-pixels", type=int, default=d["max_pixels"], help="per image")
    sv.add_argument("--max-inputs", type=int, default=d["max_inputs"], help="images or texts per request")
    sv.add_argument("--top-k", type=int, default=d["top_k"], help="labels per answer")
    sv.add_argument("--threads", type=int, default=d["threads"],
                    help="inference threads per worker; 0: the worker's share of the cores it may run on (taskset)")
    sv.add_argument("--access-log", action="store_true", help="log every request")
    sv.add_argument("--capture", metavar="DIR", help="keep inputs the model is unsure of, plus a random sample, in "
                                                     "this capture store (for `nnforge label`); off by default, "
                                                     "since inputs may be private")
    sv.add_argument("--capture-threshold", type=float, default=d["capture_threshold"],
                    help="capture inputs whose top probability is below this")
    sv.add_argument("--capture-margin", type=float, default=d["capture_margin"],
                    help="capture inputs whose top-two probability margin is below this")
    sv.add_argument("--capture-sample", type=float, default=d["capture_sample"],
                    help="share of the other inputs captured at random (an unbiased sample of the traffic)")
    sv.add_argument("--capture-max-mb", type=float, default=d["capture_max_mb"],
                    help="the store's size bound; the oldest unlabelled items are dropped first")

    dr = sub.add_parser("doctor", help="check data, model and recipe before a long run (PASS/WARN/FAIL)",
                        conflict_handler="resolve")  # the train options of every task, shared ones once
    classifiers = {k: cls for k, (t, cls) in targets.items() if t == "classify"}
    dr.add_argument("--task", choices=list(classifiers), default="image")
    dr.add_argument("--config", help="YAML file of config values; command-line flags win")
    for cls in classifiers.values():
        _add_config_options(dr, cls)
    dr.add_argument("--model", help="registered model name (default: the task's default model)")
    dr.add_argument("--out", help="folder for doctor.json and pictures (default: runs/doctor/<data name>)")
    dr.add_argument("--only", help="comma-separated subset: data,batch,init_loss,lr_range,baseline,overfit")

    cp = sub.add_parser("compare", help="per-metric and per-class differences (b - a) of two evaluated runs")
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--output", help="JSON file to write (default: RUN_A/compare_<RUN_B name>.json)")
    cp.add_argument("--threshold", type=float, default=0.01, help="F1 change that counts as a class changing")

    add_loop_commands(sub)
    from nnforge.apps.cli import add_app_parser  # the applications (bot, monitor): argparse only until they run

    add_app_parser(sub)
    lm = sub.add_parser("list-models", help="registered models, grouped by task")
    lm.add_argument("pattern", nargs="?", default="*")
    lm.add_argument("--task", help="only this task's models (classify, ...)")
    lm.add_argument("--input", "--family", dest="input", help="only models taking this input (image, text)")
    return p


def _cmd_train(a) -> int:
    from nnforge import api

    if a.nproc and a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from nnforge.engine.distributed import relaunch

        return relaunch(a.nproc, _ARGV)
    overrides = {k: v for k, v in vars(a).items() if k not in ("command", "task", "config", "resume", "nproc")}
    required = [n for n, f in train_targets()[a.task][1].model_fields.items() if f.is_required()]
    missing = [n for n in required if overrides.get(n) is None]
    if a.resume is None and a.config is None and missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ValueError(f"{flags} is required (or --config with a {missing[0]} key, or --resume RUN)")
    run = api.train(a.task, config=a.config, resume=a.resume, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process says where the run is
        print(run.path)
    return 0


def _cmd_tune(a) -> int:
    from nnforge import api

    own = ("command", "task", "config", "space", "trials", "storage", "study", "timeout", "metric", "pruner")
    overrides = {k: v for k, v in vars(a).items() if k not in own}
    summary = api.tune(a.task, space=a.space, trials=a.trials, config=a.config, storage=a.storage, study=a.study,
                       timeout=a.timeout, metric=a.metric, pruner=a.pruner, **overrides)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_evaluate(a) -> int:
    from nnforge import api

    report = api.evaluate(a.run, data=a.data, device=a.device, features=a.features, episodes=a.episodes)
    print(json.dumps({k: v for k, v in report.items() if isinstance(v, int | float | str)
                      or k in ("top_k_accuracy", "macro_avg")}))
    return 0


def _cmd_play(a) -> int:
    from nnforge import api

    result = api.play(a.run, out=a.out, seed=a.seed, max_steps=a.max_steps, device=a.device)
    print(json.dumps(result))
    return 0


def _cmd_generate(a) -> int:
    from nnforge import api
    from nnforge.data.latent_input import fresh_seed

    seed = a.seed if a.seed is not None else fresh_seed()
    out = a.out
    if out is None and a.out_dir is None:
        out = str(Path(a.run) / "samples" / f"generated{'_' + a.class_name if a.class_name else ''}_seed{seed}.png")
    result = api.generate(a.run, n=a.n, class_name=a.class_name, seed=seed, out=out, out_dir=a.out_dir,
                          force=a.force, device=a.device)
    where = out if out is not None else f"{a.out_dir}/ ({len(result['files'])} files)"
    print(f"wrote {where}: {a.n} images, seed {seed}{f', class {a.class_name}' if a.class_name else ''}")
    return 0


def _cmd_recommend(a) -> int:
    from nnforge import api

    history = [h.strip() for h in a.history.split(",") if h.strip()] if a.history is not None else None
    row = api.recommend(a.run, user=a.user, item=a.item, history=history, k=a.k, exclude_seen=a.exclude_seen,
                        device=a.device)
    if a.json:
        print(json.dumps(row))
        return 0
    if row["fallback"]:
        print(f"{row['input']}: not a known user; the most popular items instead", file=sys.stderr)
    for rank, (item, title, score) in enumerate(zip(row["items"], row["titles"], row["scores"], strict=True), 1):
        print(f"{rank:3d}  {score:10.4f}  {item}\t{title}")
    return 0


def _cmd_add_items(a) -> int:
    from nnforge import api

    result = api.add_items(a.run, a.items, id_col=a.item_col, text_cols=a.item_text_cols, title_col=a.item_title_col,
                           device=a.device)
    print(json.dumps({k: v for k, v in result.items() if k != "ids"}))
    return 0


def _check_output(path: Path, inputs: list, force: bool) -> None:
    """Refuse an --output that is a folder, one of the inputs, or an existing file (without --force)."""
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name ending in .csv or .json")
    if any(isinstance(i, str) and Path(i).exists() and Path(i).resolve() == path.resolve() for i in inputs):
        raise ValueError(f"--output {path} is one of the inputs; it would be overwritten with predictions")
    if path.exists() and not force:
        raise FileExistsError(f"--output {path} exists; pass --force to replace it")
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"--output {path}: expected a .csv or .json file name")


def _write_predictions(rows: list[dict], bad: list[dict], path: Path) -> None:
    """CSV or JSON, written whole or not at all (a temporary file renamed into place)."""
    from nnforge.engine.checkpoint import atomic_write_bytes

    if path.suffix == ".json" or any("labels" not in r for r in rows):
        atomic_write_bytes(path, json.dumps({"predictions": rows, "errors": bad}, indent=2).encode())
        return
    k = max((len(r["labels"]) for r in rows), default=0)
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["input"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")] + ["error"])
    for r in rows:
        w.writerow([r["input"]] + [x for lab, pr in zip(r["labels"], r["probs"], strict=True)
                                   for x in (lab, f"{pr:.6f}")] + [""])
    for b in bad:
        w.writerow([b["input"]] + [""] * (2 * k) + [b["error"]])
    atomic_write_bytes(path, f.getvalue().encode())


def _cmd_predict(a) -> int:
    from nnforge import api

    loaded = api.load(a.run, device=a.device)
    inputs = loaded.input.expand(a.inputs)
    if a.output:
        _check_output(Path(a.output), list(a.inputs) + inputs, a.force)
    rows, bad = loaded.predict_safely(inputs, top_k=a.top_k)
    for r in rows:
        if "labels" in r:
            answer = "  ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probs"], strict=True))
        else:
            answer = json.dumps({k: v for k, v in r.items() if k != "input"})
        print(f"{r['input']}\t{answer}")
    for b in bad:
        print(f"skipped {b['input']}: {b['error']}", file=sys.stderr)
    if a.output:
        _write_predictions(rows, bad, Path(a.output))
        print(f"wrote {a.output}", file=sys.stderr)
    return 0 if rows else 1


def _cmd_export(a) -> int:
    from nnforge import api

    card = api.export(a.run, opset=a.opset, quantize=a.quantize, tolerance=a.tolerance, exporter=a.exporter)
    print(json.dumps({"model": str(Path(a.run) / card["file"]), "opset": card["opset"],
                      "exporter": card["exporter"], "parity": card["parity"],
                      **({"int8": card["int8"]} if "int8" in card else {})}, indent=2))
    return 0


def _cmd_serve(a) -> int:
    from nnforge import api

    skip = ("command", "run", "host", "port", "workers", "token", "registry")
    options = {k: v for k, v in vars(a).items() if k not in skip}
    run = a.run
    if "@" in run and not Path(run).exists():  # NAME@ALIAS or NAME@VERSION of the registry
        from nnforge.loop.registry import Registry

        registry = Registry(a.registry)
        version = registry.get(run)
        registry.sync_pointers(version.name)  # repairs a pointer a crash left behind before anyone follows it
        which = run.partition("@")[2]
        if not which.isdigit():
            options["follow"] = str(registry.pointer(version.name, which))
        aliases = f" ({', '.join(version.aliases)})" if version.aliases else ""
        print(f"serving {version.ref}{aliases}: {version.run}"
              + (f", following {options['follow']}" if "follow" in options else ""), file=sys.stderr)
        run = version.run
    api.serve(run, a.host, a.port, a.workers, a.token, **options)
    return 0


def _cmd_doctor(a) -> int:
    from nnforge import api

    overrides = {k: v for k, v in vars(a).items() if k not in ("command", "task", "config", "out", "only")}
    if a.config is None and overrides.get("data") is None:
        raise ValueError("--data is required (or --config with a data key)")
    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
    report = api.doctor(a.task, config=a.config, out=a.out, only=only, **overrides)
    return 1 if report["status"] == "FAIL" else 0


def _cmd_compare(a) -> int:
    from nnforge import api
    from nnforge.evaluation.compare import format_comparison

    result = api.compare(a.run_a, a.run_b, output=a.output, threshold=a.threshold)
    print(format_comparison(result), end="")
    print(f"wrote {result['output']}", file=sys.stderr)
    return 0


def _cmd_list_models(a) -> int:
    from nnforge.models import get_entry, list_models, model_options

    names = list_models(a.pattern, a.task, a.input)
    for task in sorted({get_entry(n).task for n in names}):
        print(f"{task}:")
        for name in names:
            e = get_entry(name)
            if e.task == task:
                options = model_options(name)
                print(f"  {name:22s} {e.input or '':6s} {e.doc}"
                      + (f"\n{'':31s} options: {', '.join(options)}" if options else ""))
    return 0


COMMANDS = {"train": _cmd_train, "tune": _cmd_tune, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "generate": _cmd_generate,
            "recommend": _cmd_recommend, "add-items": _cmd_add_items,
            "play": _cmd_play,
            "list-models": _cmd_list_models, "doctor": _cmd_doctor, "compare": _cmd_compare,
            "export": _cmd_export, "serve": _cmd_serve, "app": lambda a: a.app_func(a), **LOOP_COMMANDS}


_ARGV: list[str] = []  # this invocation's arguments, for `--nproc`, which runs the same command under torchrun


def main(argv: list[str] | None = None) -> int:
    global _ARGV
    _ARGV = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_ARGV)
    from nnforge.engine.errors import TrainingDiverged, TrainingInterrupted

    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        # a user's mistake or the machine's (a full disk, a permission): one line, no traceback
        if isinstance(err, KeyError) and err.args:
            msg = err.args[0]
        elif isinstance(err, OSError) and err.strerror:  # "[Errno 28] ..." says less than the path and the reason
            named = err.filename and str(err.filename) not in str(err.strerror)
            msg = f"{err.filename}: {err.strerror}" if named else err.strerror
        else:
            msg = err
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
