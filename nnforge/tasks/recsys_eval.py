"""Evaluating a recommender run as recommender research does, and building the index it serves.

    report = evaluate_run("runs/recsys/exp1")      # eval/report.json, a report.html section, items.safetensors

The run's own split (split.safetensors) decides everything: every item is ranked for every user (full ranking), the
items a user interacted with in training and validation are excluded, and K = 5, 10, 20. The slices:

    test       the test interactions (random protocol: the user tower reads the training history, as BPR knows only
               that; leave-last-out: training and validation, as a sequential model would at that moment)
    test_warm  the test interactions ranked among the items seen in training only (with cold items held out): the
               gap to `test` is what the cold items cost the known ones by taking places in the lists
    cold       interactions with the items held out of training, ranked among all items
    cold_only  the same, ranked among the held-out items only (which of the new items would a user pick)

Each slice is reported for the run's model and, side by side, for popularity on the same split. The index
(items.safetensors) is rebuilt from the evaluated checkpoint, keeping the items added since training.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nnforge.data.catalogue import Catalogue, CatalogueError
from nnforge.data.interaction_splits import COLD, TEST, TRAIN, VALID, SavedSplit, load_split, padded
from nnforge.engine.run import Run
from nnforge.evaluation._html import esc
from nnforge.evaluation.ranking import ranking_metrics
from nnforge.evaluation.report import add_section, write_report
from nnforge.inference import Loaded

KS = (5, 10, 20)
HEADLINE = ("ndcg@10", "recall@10", "mrr@10", "hit@10", "precision@10", "coverage@10")
MAX_K = 1000  # the most items one request may ask for


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# scoring: any recommender (models/recsys.py) through its two methods


@torch.no_grad()
def score_fn(model, history: tuple[np.ndarray, np.ndarray], max_len: int, device
             ) -> Callable[[np.ndarray], torch.Tensor]:
    """chunk of user indices -> (b, N) scores: the user tower on each user's last max_len items of `history`."""
    items = model.item_vectors()  # (N, D), once for all users

    def scores(users: np.ndarray) -> torch.Tensor:
        h = torch.from_numpy(padded(*history, users, max_len)).to(device)
        with torch.no_grad():
            return model.user_vectors(torch.from_numpy(users).to(device), h) @ items.T

    return scores


def popularity_scores(counts: np.ndarray, seed: int) -> np.ndarray:
    """Training counts with equal counts in a seeded random order: ranked by item index they would follow the
    catalogue's order (MovieLens numbers its best-known films first), and every unseen item would tie at zero."""
    tie = np.random.default_rng(seed).permutation(len(counts)) / (len(counts) + 1.0)  # < 1: no count overtakes
    return (counts.astype(np.float64) + tie).astype(np.float32 if len(counts) < 2**20 else np.float64)


def popularity_fn(counts: np.ndarray, seed: int) -> Callable[[np.ndarray], torch.Tensor]:
    row = torch.from_numpy(popularity_scores(counts, seed))
    return lambda users: row.expand(len(users), -1)


def slice_metrics(fn, split: SavedSplit, history_parts: tuple[int, ...], ks=KS) -> dict[str, dict]:
    """The slices of a split for one scorer; a slice without users is left out."""
    exclude = split.csr(TRAIN, VALID)
    users = np.arange(split.num_users)
    out = {"test": ranking_metrics(fn, users, split.csr(TEST), exclude, split.num_items, ks)}
    cold = split.cold_items
    if len(cold):
        allowed = np.zeros(split.num_items, bool)
        allowed[cold] = True
        out["test_warm"] = ranking_metrics(fn, users, split.csr(TEST), exclude, split.num_items, ks, allowed=~allowed)
        out["cold"] = ranking_metrics(fn, users, split.csr(COLD), exclude, split.num_items, ks)
        out["cold_only"] = ranking_metrics(fn, users, split.csr(COLD), exclude, split.num_items, ks, allowed=allowed)
    return {k: v for k, v in out.items() if v["users"]}


def history_parts(split: SavedSplit) -> tuple[int, ...]:
    return (TRAIN, VALID) if split.header.get("protocol") == "leave_last_out" else (TRAIN,)


# ----------------------------------------------------------------------------------------------------------------
# the index


def build_index(run_dir: Path, model, split: SavedSplit, text_embedder=None) -> Catalogue:
    """items.safetensors from the model's item vectors, the training popularity and the items added since."""
    header = split.header
    with torch.no_grad():
        vectors = model.item_vectors().float().cpu().numpy()
    ids, titles = list(header["item_ids"]), list(header["titles"])
    popularity = split.counts(TRAIN)
    added_texts: list[str] = []
    try:
        old = Catalogue.open(run_dir)
    except CatalogueError:
        old = None
    if old is not None and len(old) > old.trained and text_embedder is not None:
        added_texts = list(old.header.get("added_texts", []))
        extra = text_embedder(added_texts)  # the new item tower sees them again
        vectors = np.concatenate([vectors, extra])
        ids += old.ids[old.trained:]
        titles += old.titles[old.trained:]
        popularity = np.concatenate([popularity, np.zeros(len(extra), np.float32)])
    elif old is not None and len(old) > old.trained:
        _log(f"index: {len(old) - old.trained} added items dropped: this model reads no item text")
    cat = Catalogue(ids, titles, vectors, popularity, len(header["item_ids"]),
                    {"model": header.get("model"), "added_texts": added_texts})
    cat.save(run_dir)
    return cat


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _table(results: dict[str, dict[str, dict]], ks=KS) -> str:
    cols = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr", "hit") for k in ks] + [f"coverage@{k}" for k in ks]
    head = "".join(f"<th>{esc(c)}</th>" for c in ["slice", "model", "users", *cols])
    rows = []
    for slice_name, by_model in results.items():
        for model, r in by_model.items():
            cells = "".join(f"<td>{r[c]:.4f}</td>" for c in cols)
            rows.append(f"<tr><td>{esc(slice_name)}</td><td>{esc(model)}</td><td>{r['users']}</td>{cells}</tr>")
    return f'<div style="overflow-x:auto"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _section(run_dir: Path, report: dict, png: Path) -> str:
    import base64

    split = report["split_info"]
    cold = f", {split['cold_items']} items held out for the cold-start slices" if split["cold_items"] else ""
    intro = (f'<p class="muted">Full ranking over all {split["items"]} items for every user with test items, items '
             f"seen in training and validation excluded; {esc(split['protocol'])} split{esc(cold)}. The user tower "
             f"reads the {esc(' + '.join(split['history']))} history. Popularity on the same split for "
             "comparison.</p>")
    img = base64.b64encode(png.read_bytes()).decode("ascii")
    return (intro + _table(report["slices"]) +
            f'<p><img alt="recall and NDCG against K" style="max-width:100%" src="data:image/png;base64,{img}"></p>')


def evaluate_run(run_path: str | Path, data: str | None = None, device: str = "auto") -> dict:
    from nnforge.config import ConfigError
    from nnforge.evaluation.ranking import plot_ranking

    run = Run(run_path)
    if data is not None:
        raise ConfigError("recommender runs are evaluated on their own split (split.safetensors); --data is not "
                          "supported for them")
    loaded = Loaded(run.path, device=device)
    split = load_split(run.path)
    model = loaded.model
    parts = history_parts(split)
    max_len = int(loaded.io["input"]["max_len"])
    fn = score_fn(model, split.csr(*parts), max_len, loaded.device)
    ours = slice_metrics(fn, split, parts)
    pop = slice_metrics(popularity_fn(split.counts(TRAIN), int(split.header.get("seed", 0))), split, parts)
    name = loaded.name
    slices = {s: {name: ours[s], **({"popularity": pop[s]} if name != "popularity" else {})} for s in ours}
    info = {"protocol": split.header.get("protocol"), "users": split.num_users, "items": split.num_items,
            "cold_items": int(len(split.cold_items)), "history": [("train", "valid")[p] for p in parts],
            "interactions": {p: int((split.part == code).sum()) for p, code in
                             (("train", TRAIN), ("valid", VALID), ("test", TEST), ("cold", COLD))}}
    test = ours.get("test", {})
    report = {"split": "test", "model": name, **{k: test[k] for k in HEADLINE if k in test},
              **({f"cold_{k}": ours["cold"][k] for k in ("recall@10", "ndcg@10")} if "cold" in ours else {}),
              "users": test.get("users", 0), "ks": list(KS), "slices": slices, "split_info": info}
    run.write_json("eval/report.json", report)
    png = plot_ranking(slices, KS, run.eval_dir / "ranking.png")
    add_section(run.path, "ranking", "Ranking metrics", _section(run.path, report, png))
    build_index(run.path, model, split, _added_embedder(loaded))
    summary = ", ".join(f"{k} {test[k]:.4f}" for k in ("recall@10", "ndcg@10", "mrr@10") if k in test)
    cold = (f"; cold items: recall@10 {ours['cold']['recall@10']:.4f} (popularity "
            f"{pop['cold']['recall@10']:.4f})") if "cold" in ours and name != "popularity" else ""
    _log(f"evaluate: {test.get('users', 0)} users, {summary} (popularity: recall@10 "
         f"{pop['test']['recall@10']:.4f}, ndcg@10 {pop['test']['ndcg@10']:.4f}){cold}; details in {run.eval_dir}")
    _log(f"report: {write_report(run.path)}")
    return report


def _added_embedder(loaded: Loaded):
    """texts -> item vectors through the run's item tower (for items added since training), or None."""
    if not loaded.model.reads_text:
        return None
    from nnforge.tasks.recsys_items import item_text_vectors

    return lambda texts: item_text_vectors(loaded, texts)
