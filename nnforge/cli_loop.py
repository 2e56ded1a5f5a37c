"""The continuous-learning commands (registry, label, retrain, gate, loop): argument parsing and printing only; the
work happens in nnforge.loop. Kept apart from cli.py, which holds the per-run verbs.

    nnforge registry add shoes runs/image/exp3 | list shoes | show shoes@champion | history shoes
    nnforge registry promote shoes 2 | rollback shoes
    nnforge label captures/ [--port 8001]
"""

from __future__ import annotations

import argparse
import json
import time


def _registry_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", help="SQLAlchemy URL of the registry store, e.g. sqlite:///runs/registry.db or "
                                      "postgresql+psycopg://user:pass@host/db (default: $NNFORGE_REGISTRY, else "
                                      "runs/registry.db)")


def add_loop_commands(sub) -> None:
    rg = sub.add_parser("registry", help="versions of named models, their champion/challenger aliases and history")
    ops = rg.add_subparsers(dest="op", required=True)
    add = ops.add_parser("add", help="register a trained run as a new version of NAME (the first is champion)")
    add.add_argument("name")
    add.add_argument("run")
    add.add_argument("--note", help="free text kept with the version")
    add.add_argument("--as", dest="alias", choices=["challenger"], help="also name it challenger")
    for op, help_ in (("list", "every version of NAME"), ("history", "every move of NAME's aliases")):
        o = ops.add_parser(op, help=help_)
        o.add_argument("name")
    show = ops.add_parser("show", help="one version (NAME@VERSION, NAME@champion, NAME@challenger) in detail")
    show.add_argument("ref")
    show.add_argument("--server", action="append", default=[], metavar="URL",
                      help="a server of this model: prints its drift scores from /metrics (repeatable)")
    pro = ops.add_parser("promote", help="VERSION becomes champion (servers following NAME@champion reload)")
    pro.add_argument("name")
    pro.add_argument("version", type=int)
    pro.add_argument("--reason", default="promoted by hand")
    rb = ops.add_parser("rollback", help="the champion goes back to the previous one")
    rb.add_argument("name")
    for o in (add, show, pro, rb, *[ops.choices[k] for k in ("list", "history")]):
        _registry_option(o)

    lb = sub.add_parser("label", help="a web page for labelling the inputs a server captured (--capture DIR)")
    lb.add_argument("folder", metavar="DIR", help="the capture folder (capture.db and items/)")
    lb.add_argument("--host", default="127.0.0.1", help="any non-loopback address needs a token")
    lb.add_argument("--port", type=int, default=8001, help="TCP port")
    lb.add_argument("--by", help="name recorded with every label (default: the OS user)")
    lb.add_argument("--token", help="bearer token for every /api/ path (default: $NNFORGE_TOKEN); the page takes "
                                    "it from its address: http://HOST:PORT/?token=T")

    rt = sub.add_parser("retrain", help="NAME's challenger: warm start from the champion on its data + new labels")
    rt.add_argument("name")
    rt.add_argument("--labels", nargs="+", required=True, metavar="DIR", help="capture folders with labelled items")
    rt.add_argument("--new-weight", type=float, default=0.3,
                    help="share of the training examples the new labels make up after oversampling")
    rt.add_argument("--epochs", type=int, help="instead of the champion's")
    rt.add_argument("--lr", type=float, help="instead of the champion's")
    rt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config field, e.g. --set batch_size=64 (repeatable)")
    gt = sub.add_parser("gate", help="champion vs challenger on the frozen holdout and the fresh slice; promote "
                                     "the challenger only if it is not worse")
    gt.add_argument("name")
    gt.add_argument("--tolerance", type=float, default=0.01, help="largest accuracy drop allowed")
    gt.add_argument("--class-tolerance", type=float, default=0.1, help="largest drop of any class's recall")
    gt.add_argument("--dry-run", action="store_true", help="decide and write the report, promote nothing")
    gt.add_argument("--reload", action="append", default=[], metavar="URL",
                    help="a server to POST /v1/reload after a promotion (repeatable); servers of NAME@champion "
                         "follow the registry without it")
    gt.add_argument("--token", help="bearer token for those servers (default: $NNFORGE_TOKEN)")
    lp = sub.add_parser("loop", help="the whole cycle: wait for new labels, retrain, gate, promote")
    lp.add_argument("name")
    lp.add_argument("--config", required=True, help="loop.yaml (nnforge/loop/cycle.py documents its keys)")
    lp.add_argument("--once", action="store_true", help="one check (and round, if due), then exit")
    for o in (rt, gt, lp):
        _registry_option(o)


def _registry(a):
    from nnforge.loop.registry import Registry

    return Registry(a.registry)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _metrics(m: dict) -> str:
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
                    if k in ("accuracy", "macro_f1", "nll", "n"))


def _cmd_registry(a) -> int:
    reg = _registry(a)
    if a.op == "add":
        v = reg.add(a.name, a.run, note=a.note, alias=a.alias)
        print(f"registered {v.ref}{' (' + ', '.join(v.aliases) + ')' if v.aliases else ''}: {v.run}")
    elif a.op == "list":
        for v in reg.list(a.name):
            print(f"{v.version:4d}  {','.join(v.aliases) or '-':18s} {_when(v.created_at)}  {_metrics(v.metrics)}"
                  f"  parent {v.parent or '-'}  by {v.created_by or '-'}  {v.run}")
    elif a.op == "show":
        v = reg.get(a.ref)
        print(json.dumps({**v.__dict__, "created_at": _when(v.created_at)}, indent=2))
        for url in a.server:
            from nnforge.loop.drift import read_drift

            for line in read_drift(url):
                print(f"{url}: {line}")
    elif a.op == "history":
        for h in reg.history(a.name):
            print(f"{_when(h['at'])}  {h['alias']:10s} {h['from_version'] or '-'} -> {h['to_version'] or '-'}  "
                  f"by {h['by'] or '-'}: {h['reason'] or ''}")
    elif a.op == "promote":
        v = reg.promote(a.name, a.version, reason=a.reason)
        print(f"{v.ref} is champion")
    elif a.op == "rollback":
        v = reg.rollback(a.name)
        print(f"rolled back: {v.ref} is champion again")
    return 0


def _cmd_label(a) -> int:
    from nnforge.loop.label import run

    run(a.folder, host=a.host, port=a.port, by=a.by, token=a.token, say=print)
    return 0


def _cmd_retrain(a) -> int:
    import yaml

    from nnforge.loop.retrain import retrain

    overrides = {}
    for text in a.overrides:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {text!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    overrides.update({k: v for k, v in (("epochs", a.epochs), ("lr", a.lr)) if v is not None})
    v = retrain(a.name, a.labels, _registry(a), new_weight=a.new_weight, **overrides)
    print(f"registered {v.ref} as challenger (parent {a.name}@{v.parent}): {v.run}")
    print(f"next: nnforge gate {a.name}")
    return 0


def _cmd_gate(a) -> int:
    from nnforge.loop.gate import gate

    d = gate(a.name, _registry(a), a.tolerance, a.class_tolerance, dry_run=a.dry_run, reload=a.reload,
             token=a.token)
    if d.promoted:
        print(f"{a.name}@{d.challenger} is champion")
    return 0 if d.promote else 1


def _cmd_loop(a) -> int:
    from nnforge.loop.cycle import load_loop_config, run_loop

    for r in run_loop(a.name, load_loop_config(a.config), _registry(a), once=a.once):
        print(f"loop: round done: challenger {a.name}@{r['challenger']}: {r['reason']}")
    return 0


LOOP_COMMANDS = {"registry": _cmd_registry, "label": _cmd_label, "retrain": _cmd_retrain, "gate": _cmd_gate,
                 "loop": _cmd_loop}
