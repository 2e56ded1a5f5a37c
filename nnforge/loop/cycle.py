"""The whole cycle, unattended: wait for new labels (or a schedule), retrain, gate, promote.

    nnforge loop shoes --config loop.yaml [--once]

loop.yaml (config.LoopConfig; every key but labels has a default):

    labels: [captures/]        # what `nnforge serve shoes@champion --capture captures/` fills and people label
    min_new_labels: 100        # a round starts once this many labels are new to the champion
    every: 86400               # ... or once a day if any label is new
    retrain: {epochs: 3}       # config fields that win over the champion's
    tolerance: 0.01            # the gate's (nnforge gate --help)

Each round is retrain -> gate; its record (time, new labels, challenger, decision, report) is appended to
REGISTRY/NAME/loop.jsonl. Safe to stop and start again at any point: a challenger left registered by an interrupted
round is gated first, before any new training; an interrupted training leaves no version behind; the champion
changes only in the gate's promotion, one transaction.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nnforge.config import LoopConfig, build_config, read_yaml_mapping
from nnforge.deploy.capture import CaptureStore
from nnforge.loop.gate import gate
from nnforge.loop.registry import Registry, RegistryError
from nnforge.loop.retrain import pending, retrain


def load_loop_config(path: str | Path) -> LoopConfig:
    return build_config(LoopConfig, read_yaml_mapping(path))


def _challenger(reg: Registry, name: str):
    try:
        return reg.get(f"{name}@challenger")
    except RegistryError:
        return None


def one_round(name: str, cfg: LoopConfig, reg: Registry) -> dict | None:
    """One round if it is due: returns its record, or None when nothing was done."""
    log = reg.folder / name / "loop.jsonl"
    stores = [CaptureStore(p) for p in cfg.labels]
    record: dict = {"at": time.time()}
    left_over = _challenger(reg, name)
    if left_over is None:
        champion = reg.get(f"{name}@champion")
        new = pending(champion.run, stores)
        last = _last_round_at(log)
        due = new >= cfg.min_new_labels or (cfg.every is not None and new > 0 and time.time() - last >= cfg.every)
        if not due:
            print(f"loop: {name}: {new} new labels (a round starts at {cfg.min_new_labels}); waiting", flush=True)
            return None
        record.update(champion=champion.version, new_labels=new)
        challenger = retrain(name, cfg.labels, reg, new_weight=cfg.new_weight, by="loop", **cfg.retrain)
    else:
        print(f"loop: {name}@{left_over.version} is a challenger from an earlier round; gating it first", flush=True)
        challenger = left_over
        record.update(champion=reg.get(f"{name}@champion").version, resumed=True)
    d = gate(name, reg, cfg.tolerance, cfg.class_tolerance, reload=cfg.reload, token=cfg.token, by="loop")
    record.update(challenger=challenger.version, promoted=d.promoted, reason=d.reason, report=d.report,
                  scores={k: {m: {x: s[m].get(x) for x in ("accuracy", "n")} for m in s} for k, s in d.scores.items()})
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _last_round_at(log: Path) -> float:
    if not log.is_file():
        return 0.0
    lines = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return json.loads(lines[-1])["at"] if lines else 0.0


def run_loop(name: str, cfg: LoopConfig, reg: Registry | None = None, once: bool = False) -> list[dict]:
    """Rounds until max_rounds (or one check with once=True); Ctrl-C stops between steps safely."""
    reg = reg or Registry()
    rounds: list[dict] = []
    while True:
        record = one_round(name, cfg, reg)
        if record is not None:
            rounds.append(record)
        if once or (cfg.max_rounds is not None and len(rounds) >= cfg.max_rounds):
            return rounds
        time.sleep(cfg.poll_s)
