"""Retrain: a challenger from the champion, its training data and the new labels.

    nnforge retrain shoes --labels captures/ [--epochs 3] [--new-weight 0.3]

The challenger starts from the champion's weights (head included, since the classes are the same) with the
champion's config, and trains on:

- the original data, replayed: the train and validation splits of the first version of the lineage (so earlier
  classes and the clean distribution are not forgotten);
- the labelled captured items, each assigned once and for good to train (60%), validation (15%) or the fresh slice
  (25%, never trained on: the gate judges champion and challenger on it). The assignment is a hash of the item, so
  it does not change when retrain runs again; it is kept in RUN/loop.json and inherited by the next challenger;
- the new training items oversampled, so that they make about --new-weight of the training examples (at most 20
  copies each): a few hundred new labels among ten thousand old ones would otherwise barely move the model.

The challenger's test split is the name's frozen holdout, so its own report.html is on the holdout. It is
registered as NAME's challenger with the champion as parent; `nnforge gate NAME` decides whether it serves.
Interrupting retrain leaves no version behind (a version is registered only after its run has finished), and the
data folder it writes is rebuilt the same way on the next try.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import yaml

from nnforge.deploy.capture import CaptureStore
from nnforge.loop.registry import Registry, RegistryError, Version

SHARES = {"train": 0.60, "val": 0.15, "fresh": 0.25}
MAX_REPEAT = 20
LOOP_FILE = "loop.json"


def item_key(value: str, kind: str) -> str:
    """What makes two labelled items the same input: the text, or the image's bytes (not its path: the same picture
    captured by two servers, or twice, is one item, and its later label wins)."""
    if kind == "image":
        return "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return value


def assign(key: str, seed: int = 0) -> str:
    """train | val | fresh for one item, from a hash of it: stable across runs, machines and label order."""
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    edge = 0.0
    for split, share in SHARES.items():
        edge += share
        if u < edge:
            return split
    return "train"


def lineage_state(run: Path) -> dict:
    """RUN/loop.json of a retrained run, or the state of a first version (its own run is the root)."""
    path = run / LOOP_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {"root": str(run), "new": {}}


def new_labels(stores: list[CaptureStore]) -> list[tuple[str, str, str]]:
    """(input, label, kind) of every labelled item of the stores; a later store's label wins for the same input."""
    out: dict[str, tuple[str, str, str]] = {}
    for store in stores:
        for it in store.items(status="labelled"):
            value = Path(it["path"]).read_text(encoding="utf-8") if it["kind"] == "text" else it["path"]
            out[item_key(value, it["kind"])] = (value, it["label"], it["kind"])
    return list(out.values())


def pending(champion_run: str | Path, stores: list[CaptureStore]) -> int:
    """How many labelled items the champion's lineage has not seen yet (what `nnforge loop` waits for)."""
    state = lineage_state(Path(champion_run))
    seen = state.get("new", {})
    return sum(1 for value, _, kind in new_labels(stores) if item_key(value, kind) not in seen)


def plan_data(champion: Version, stores: list[CaptureStore], holdout: Path, new_weight: float) -> dict:
    """Everything the challenger trains and is judged on: root splits, new items by split, repeat count."""
    run = Path(champion.run)
    state = lineage_state(run)
    root = Path(state["root"])
    split = json.loads((root / "split.json").read_text())
    classes = set(json.loads((run / "meta.json").read_text()).get("classes") or [y for _, y in split["train"]])
    assigned: dict[str, dict] = dict(state.get("new", {}))
    for value, label, kind in new_labels(stores):
        if label not in classes:
            raise RegistryError(f"label {label!r} of a captured item is not one of the model's classes "
                                f"{sorted(classes)}; relabel it")
        key = item_key(value, kind)
        old = assigned.get(key)
        assigned[key] = {"value": value, "label": label, "split": old["split"] if old else assign(key)}
    train_new = [(a["value"], a["label"]) for a in assigned.values() if a["split"] == "train"]
    if not assigned:
        raise RegistryError("no labelled items: label captured inputs first (`nnforge label DIR`)")
    old_train = split["train"]
    repeat = 1
    if train_new and 0 < new_weight < 1:
        repeat = round(new_weight * len(old_train) / ((1 - new_weight) * len(train_new)))
        repeat = max(1, min(MAX_REPEAT, repeat))
    return {
        "root": str(root), "new": assigned, "repeat": repeat,
        "splits": {
            "train": [tuple(p) for p in old_train] + train_new * repeat,
            "val": [tuple(p) for p in split.get("val") or []]
            + [(a["value"], a["label"]) for a in assigned.values() if a["split"] == "val"],
            "test": [tuple(p) for p in json.loads(holdout.read_text())["items"]],
        },
        "fresh": [(a["value"], a["label"]) for a in assigned.values() if a["split"] == "fresh"],
    }


def write_data(folder: Path, splits: dict, text: bool, text_col: str = "text") -> Path:
    """The planned splits in a layout `nnforge train` reads: one CSV with a split column (images), or
    train/val/test.jsonl (texts, which may hold commas, quotes and newlines)."""
    folder.mkdir(parents=True, exist_ok=True)
    if text:
        for name, pairs in splits.items():
            tmp = folder / f"{name}.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for value, label in pairs:
                    f.write(json.dumps({text_col: value, "label": label}, ensure_ascii=False) + "\n")
            os.replace(tmp, folder / f"{name}.jsonl")
        return folder
    path = folder / "data.csv"
    tmp = folder / "data.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for name, pairs in splits.items():
            w.writerows([value, label, name] for value, label in pairs)
    os.replace(tmp, path)
    return path


def retrain(name: str, labels: str | Path | list, registry: Registry | None = None, new_weight: float = 0.3,
            by: str = "retrain", **overrides) -> Version:
    """Train NAME's challenger from its champion (see the module docstring); returns the registered version.

    labels: one or more capture folders; overrides: config fields that win over the champion's (epochs, lr, ...).
    """
    from nnforge import api

    reg = registry or Registry()
    champion = reg.get(f"{name}@champion")
    run = Path(champion.run)
    stores = [CaptureStore(p) for p in ([labels] if isinstance(labels, str | Path) else labels)]
    plan = plan_data(champion, stores, reg.holdout(name), new_weight)
    meta = json.loads((run / "meta.json").read_text())
    target = meta.get("train") or meta.get("task")
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    text = "text_col" in config
    number = max(v.version for v in reg.list(name)) + 1
    data = write_data(reg.folder / name / "data" / f"v{number}", plan["splits"], text)
    cols = {"text_col": "text", "label_col": "label"} if text else {"path_col": "path", "label_col": "label"}
    for key in ("resume", "name"):
        config.pop(key, None)
    runs = run.parent.parent if run.parent.name == target else run.parent  # runs/<target>/<name>
    config.update(data=str(data), weights=str(run), out=str(runs), **cols)
    config.update(overrides)
    if "name" not in config:  # a run left by an interrupted retrain keeps its folder; this one gets the next name
        config["name"] = next(f"{name}-v{number}" + (f"-{k}" if k else "") for k in range(1000)
                              if not (runs / target / (f"{name}-v{number}" + (f"-{k}" if k else ""))).exists())
    cfg_path = (data if text else data.parent) / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    n_new = sum(1 for a in plan["new"].values() if a["split"] != "fresh")
    print(f"retrain: {name}@{champion.version} -> challenger; {len(plan['splits']['train'])} training examples "
          f"({n_new} new labels kept for training and validation, training ones x{plan['repeat']}), "
          f"{len(plan['fresh'])} fresh for the gate, holdout {len(plan['splits']['test'])}", flush=True)
    new_run = api.train(target, config=cfg_path).path
    (new_run / LOOP_FILE).write_text(json.dumps({
        "root": plan["root"], "parent": {"name": name, "version": champion.version, "run": str(run)},
        "labels_from": [str(s.folder) for s in stores], "repeat": plan["repeat"], "new_weight": new_weight,
        "new": plan["new"], "fresh": plan["fresh"]}, ensure_ascii=False))
    return reg.add(name, new_run, created_by=by, parent=champion.version, alias="challenger",
                   note=f"retrained from {name}@{champion.version} with {len(plan['new'])} labels "
                        f"from {', '.join(str(s.folder) for s in stores)}")
