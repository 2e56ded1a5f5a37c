"""The continuous-learning loop on real parts: a SQLite registry file, real run folders trained on PNG files, a
capture store filled by the server's Capturer, retraining, and the gate's decisions."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CLASSES, make_png_tree

import nnforge
from nnforge.config import LoopConfig
from nnforge.deploy.capture import Capturer, CaptureStore
from nnforge.engine.errors import TrainingDiverged
from nnforge.inference import Loaded
from nnforge.loop.cycle import one_round
from nnforge.loop.gate import gate
from nnforge.loop.registry import Registry, RegistryError
from nnforge.loop.retrain import pending, retrain

TRAIN = dict(epochs=3, batch_size=8, workers=1, precision="fp32", lr=3e-3, val_split=0.2, test_split=0.2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A champion trained on shapes, registered; traffic images captured by the server's Capturer."""
    root = tmp_path_factory.mktemp("loop")
    data = make_png_tree(root / "data" / "shapes", per_class=20, bad_files=False)
    champion = nnforge.train("image", data=str(data), out=str(root / "runs"), name="champion", **TRAIN).path
    reg = Registry(f"sqlite:///{root / 'runs' / 'registry.db'}")
    reg.add("shapes", champion)
    traffic = make_png_tree(root / "traffic" / "shapes", per_class=12, seed=7, bad_files=False)
    other = make_png_tree(root / "other" / "shapes", per_class=8, seed=8, bad_files=False)
    return {"root": root, "reg": reg, "champion": champion, "traffic": sorted(traffic.rglob("*.png")),
            "other": sorted(other.rglob("*.png"))}


def capture_all(folder: Path, run: Path, files: list[Path]) -> CaptureStore:
    """Every traffic image through the Capturer (threshold above 1: all kept), as the server would."""
    cap = Capturer(folder, threshold=1.01, sample=0.0)
    loaded = Loaded(run, device="cpu")
    probs = np.concatenate([loaded.output.finish(raw) for _, raw, _ in loaded.chunks([str(f) for f in files])])
    cap.offer([(f.name, f.read_bytes()) for f in files], probs, list(loaded.classes),
              {"model": "m", "version": "v", "run": str(run)})
    cap.close()
    return cap.store


def label_store(store: CaptureStore, files: list[Path], wrong: bool = False) -> None:
    """The oracle labeller: the class folder of each file (captured in order), or the next class (wrong=True)."""
    items = store.items()
    assert len(items) == len(files)
    for it, f in zip(items, files, strict=True):
        label = f.parent.name
        assert Path(it["path"]).read_bytes() == f.read_bytes()
        store.set_label(it["id"], CLASSES[(CLASSES.index(label) + 1) % 3] if wrong else label, by="oracle")


def test_registry_versions_aliases_history_and_rollback(tmp_path, trained_run):
    db = tmp_path / "registry.db"
    reg = Registry(f"sqlite:///{db}")
    v1 = reg.add("m", trained_run, note="first")
    assert v1.version == 1 and v1.aliases == ["champion"] and v1.metrics["n"] > 0
    holdout = json.loads(reg.holdout("m").read_text())["items"]
    assert holdout == json.loads((trained_run / "split.json").read_text())["test"]
    pointer = json.loads(reg.pointer("m").read_text())
    assert pointer == {"name": "m", "alias": "champion", "version": 1, "run": str(trained_run.resolve())}
    v2 = reg.add("m", trained_run, alias="challenger", parent=1)
    v3 = reg.add("m", trained_run)
    assert (v2.aliases, v3.aliases, v2.parent) == (["challenger"], [], 1)
    assert reg.get("m@challenger").version == 2 and reg.get("m").version == 1
    reg.promote("m", 2)
    assert reg.get("m@champion").version == 2 and json.loads(reg.pointer("m").read_text())["version"] == 2
    assert not reg.pointer("m", "challenger").exists()  # the challenger became champion
    reg.promote("m", 3)
    assert reg.rollback("m").version == 2
    assert reg.rollback("m").version == 1  # two rollbacks go two champions back, not back and forth
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback("m")
    moves = [(h["alias"], h["from_version"], h["to_version"]) for h in reg.history("m")]
    assert moves == [("champion", None, 1), ("challenger", None, 2), ("champion", 1, 2), ("challenger", 2, None),
                     ("champion", 2, 3), ("champion", 3, 2), ("champion", 2, 1)]
    for bad in ("m@7", "m@best", "nope@champion"):
        with pytest.raises(RegistryError):
            reg.get(bad)
    # a folder that is not a finished run is refused, and leaves no half version behind
    with pytest.raises(RegistryError, match="meta.json"):
        reg.add("m", tmp_path)
    rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM versions WHERE name = 'm'").fetchone()[0]
    assert rows == 3
    # a second process (a fresh Registry on the same file) sees the same store
    assert [v.version for v in Registry(f"sqlite:///{db}").list("m")] == [1, 2, 3]


def test_retrain_better_challenger_is_promoted(world):
    reg, root = world["reg"], world["root"]
    store = capture_all(root / "captures", world["champion"], world["traffic"])
    label_store(store, world["traffic"])
    assert pending(world["champion"], [store]) == len(world["traffic"])
    v = retrain("shapes", root / "captures", reg, epochs=2)
    assert (v.version, v.parent, v.aliases, v.created_by) == (2, 1, ["challenger"], "retrain")
    state = json.loads((Path(v.run) / "loop.json").read_text())
    assert state["parent"]["version"] == 1 and state["root"] == str(world["champion"])
    split = json.loads((Path(v.run) / "split.json").read_text())
    holdout = json.loads(reg.holdout("shapes").read_text())["items"]
    assert split["test"] == holdout  # the challenger's own report is on the frozen holdout
    fresh = {p for p, _ in state["fresh"]}
    assert fresh and not fresh & {p for p, _ in split["train"] + split["val"]}  # never trained on
    d = gate("shapes", reg)
    assert d.promote and d.promoted, d.reason
    assert reg.get("shapes@champion").version == 2
    assert Path(d.report).is_file() and "promoted" in Path(d.report).read_text()
    assert pending(v.run, [store]) == 0  # the new champion's lineage has seen every label


def test_worse_challenger_is_refused_with_the_reason(world):
    reg, root = world["reg"], world["root"]
    champion = reg.get("shapes@champion")
    # the traffic captured again and labelled with the wrong class: a later label of the same input wins, so every
    # new label the challenger trains on is wrong (fresh images would leave the right ones of the lineage beside them)
    store = capture_all(root / "wrong", Path(champion.run), world["traffic"])
    label_store(store, world["traffic"], wrong=True)
    v = retrain("shapes", root / "wrong", reg, new_weight=0.8, epochs=2, batch_size=16, lr=1e-2)
    assert len(json.loads((Path(v.run) / "loop.json").read_text())["new"]) == len(world["traffic"])  # by content
    d = gate("shapes", reg)
    assert not d.promote and not d.promoted
    assert d.reason.startswith("refused: holdout accuracy") or "recall" in d.reason, d.reason
    assert reg.get("shapes@champion").version == champion.version
    with pytest.raises(RegistryError):  # the refused version lost the challenger alias; the history says why
        reg.get("shapes@challenger")
    last = reg.history("shapes")[-1]
    assert (last["alias"], last["from_version"], last["to_version"]) == ("challenger", v.version, None)
    assert last["reason"].startswith("refused")


def test_a_diverged_run_is_never_promoted(world, tmp_path):
    reg = world["reg"]
    run = nnforge.train("image", data=str(world["root"] / "data" / "shapes"), out=str(tmp_path), name="nan",
                        **{**TRAIN, "epochs": 1}).path
    with pytest.raises(TrainingDiverged):
        nnforge.train("image", resume=str(run), epochs=3, lr=1e12)
    assert json.loads((run / "meta.json").read_text())["outcome"] == "diverged"
    before = reg.get("shapes@champion").version
    v = reg.add("shapes", run, alias="challenger")
    d = gate("shapes", reg)
    assert not d.promoted and "did not finish cleanly (outcome: diverged" in d.reason
    assert reg.get("shapes@champion").version == before != v.version


def test_loop_round_waits_for_labels_then_retrains_and_gates(world, tmp_path):
    reg = world["reg"]
    champion = reg.get("shapes@champion")
    files = world["other"][::2]
    store = capture_all(tmp_path / "cap", Path(champion.run), files)
    cfg = LoopConfig(labels=[str(tmp_path / "cap")], min_new_labels=len(files), retrain={"epochs": 1})
    assert one_round("shapes", cfg, reg) is None  # nothing labelled yet: no round
    label_store(store, files)
    record = one_round("shapes", cfg, reg)
    assert record is not None and record["new_labels"] == len(files) and record["champion"] == champion.version
    log = [json.loads(ln) for ln in (reg.folder / "shapes" / "loop.jsonl").read_text().splitlines()]
    assert log[-1]["challenger"] == record["challenger"]
    after = reg.get("shapes@champion").version
    assert after == (record["challenger"] if record["promoted"] else champion.version)


def test_loop_cli(world, tmp_path):
    from nnforge.cli import main

    url = world["reg"].url
    assert main(["registry", "list", "shapes", "--registry", url]) == 0
    assert main(["registry", "history", "shapes", "--registry", url]) == 0
    assert main(["registry", "show", "shapes@champion", "--registry", url]) == 0
    assert main(["registry", "show", "shapes@99", "--registry", url]) == 2
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"labels": [str(tmp_path)], "bogus": 1}))
    assert main(["loop", "shapes", "--config", str(tmp_path / "loop.yaml"), "--registry", url]) == 2


def test_text_lineage_retrains_from_captured_texts(tmp_path):
    from test_text_e2e import review

    rng = np.random.default_rng(1)
    data = tmp_path / "reviews.csv"
    rows = [(review(rng, lab), lab) for i in range(120) for lab in [("pos", "neg")[i % 2]]]
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    run = nnforge.train("text", data=str(data), model="fasttext", epochs=2, batch_size=16, precision="fp32",
                        out=str(tmp_path / "runs"), name="v1", val_split=0.15, test_split=0.2).path
    reg = Registry(f"sqlite:///{tmp_path / 'runs' / 'registry.db'}")
    reg.add("sentiment", run)
    texts = [(review(rng, lab) + ', "quoted"\nsecond line', lab) for i in range(40) for lab in [("pos", "neg")[i % 2]]]
    loaded = Loaded(run, device="cpu")
    probs = np.concatenate([loaded.output.finish(raw) for _, raw, _ in loaded.chunks([t for t, _ in texts])])
    cap = Capturer(tmp_path / "cap", threshold=1.01, sample=0.0)
    cap.offer([(f"text{i}", t) for i, (t, _) in enumerate(texts)], probs, list(loaded.classes), {"run": str(run)})
    cap.close()
    truth = dict(texts)
    for it in cap.store.items():
        cap.store.set_label(it["id"], truth[Path(it["path"]).read_text(encoding="utf-8")])
    v = retrain("sentiment", tmp_path / "cap", reg, epochs=1)
    split = json.loads((Path(v.run) / "split.json").read_text())
    trained = {t for t, _ in split["train"] + split["val"]}
    fresh = {t for t, _ in json.loads((Path(v.run) / "loop.json").read_text())["fresh"]}
    assert trained & set(truth) and fresh and not fresh & trained  # texts with commas, quotes, newlines intact
    d = gate("sentiment", reg, dry_run=True)
    holdout = json.loads(reg.holdout("sentiment").read_text())["items"]
    assert d.checks[0]["ok"] and d.scores["holdout"]["champion"]["n"] == len(holdout) > 0
    assert d.scores["fresh"]["challenger"]["n"] == len(fresh)
    assert reg.get("sentiment@challenger").version == 2  # a dry run moves nothing
