"""Items added to a recommender run without retraining: each new item's text goes through the run's item tower on
arrival and its vector joins the index (items.safetensors), so it can be recommended at once.

    nnforge add-items runs/recsys/exp1 new_items.csv [--item-text-cols title,genres]
    nnforge.add_items("runs/recsys/exp1", [{"id": "n1", "title": "Alien Dawn", "text": "Alien Dawn. Sci-Fi"}])

The model itself is unchanged: a new item has no id embedding (its vector is the text part alone, as for the
cold-start items the model was evaluated on), and a user tower leaves it out of a history until the model is
retrained. A running server reads items.safetensors again when it changes: its next answer can hold the new items.
Models that read no item text (popularity, bpr) cannot place a new item and refuse.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from nnforge.data.catalogue import Catalogue
from nnforge.data.interactions import read_items
from nnforge.engine.run import Run
from nnforge.inference import Loaded

ADD_MAX = 1_000_000  # items one call may add


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.no_grad()
def item_text_vectors(loaded: Loaded, texts: list[str]) -> np.ndarray:
    """(n, D) item vectors of new items from their texts, through the run's own text encoder and projection."""
    from nnforge.data.item_text import embed_texts, encoder_source, tokenize

    model = loaded.model
    if not texts:
        return np.zeros((0, model.item_vectors(torch.zeros(1, dtype=torch.long, device=loaded.device)).shape[-1]),
                        np.float32)
    meta = loaded.run.read_json("meta.json")
    encoder, max_tokens = meta.get("text_encoder"), int(meta.get("text_max_tokens", 64))
    if model.fine_tune_text:  # the run's own, fine-tuned encoder
        ids = torch.from_numpy(tokenize(texts, encoder_source(encoder), max_tokens)).to(loaded.device)
        pooled = torch.cat([model.encode_text(ids[s:s + 256]) for s in range(0, len(ids), 256)])
    else:
        pooled = torch.from_numpy(embed_texts(texts, encoder, max_tokens, cache=False)).to(loaded.device)
    return model.text_vectors(pooled).float().cpu().numpy()


def _rows(items, id_col: str | None, text_cols: str | None, title_col: str | None) -> list[tuple[str, str, str]]:
    """(id, title, text) of each new item, from a CSV/TSV file or a list of {"id", "title", "text"} dicts."""
    if isinstance(items, str | Path):
        cols = [c.strip() for c in text_cols.split(",") if c.strip()] if text_cols else None
        table = read_items(Path(items), id_col, cols, title_col)
        return [(i, table.titles[i], table.texts[i]) for i in table.ids]
    rows = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"items[{n}]: expected a dict with an id, a title and a text, got {item!r}")
        title = str(item.get("title", ""))
        rows.append((str(item["id"]), title, str(item.get("text") or title)))
    return rows


def add_items(run_path: str | Path, items, id_col: str | None = None, text_cols: str | None = None,
              title_col: str | None = None, device: str = "auto") -> dict:
    """Append new items to RUN's index; returns {"added", "items" (catalogue size), "ids"}."""
    run = Run(run_path)
    rows = _rows(items, id_col, text_cols, title_col)
    if not rows:
        raise ValueError("no items to add")
    if len(rows) > ADD_MAX:
        raise ValueError(f"{len(rows)} items in one call; the limit is {ADD_MAX}")
    empty = [i for i, _, text in rows if not text.strip()]
    if empty:
        raise ValueError(f"item {empty[0]!r} has no text: a new item is placed by its text alone")
    run.lock()  # one writer of the run's files at a time (not while it trains or evaluates)
    try:
        cat = Catalogue.open(run.path)
        taken = [i for i, _, _ in rows if i in cat.index_of]
        repeated = len({i for i, _, _ in rows}) != len(rows)
        if taken or repeated:
            raise ValueError(f"item {taken[0]!r} is already in the catalogue" if taken else
                             "an item id appears twice among the new items")
        loaded = Loaded(run.path, device=device)
        if not loaded.model.reads_text:
            raise ValueError(f"{run.path} is a {loaded.name} model, which reads no item text: new items cannot be "
                             "placed without retraining (a text-aware model such as two_tower can)")
        texts = [text for _, _, text in rows]
        vectors = item_text_vectors(loaded, texts)
        grown = Catalogue(cat.ids + [i for i, _, _ in rows], cat.titles + [t for _, t, _ in rows],
                          np.concatenate([cat.vectors, vectors]),
                          np.concatenate([cat.popularity, np.zeros(len(rows), np.float32)]), cat.trained,
                          {**cat.header, "added_texts": list(cat.header.get("added_texts", [])) + texts})
        grown.save(run.path)
    finally:
        run.unlock()
    _log(f"add-items: {len(rows)} items added to {run.path} ({len(grown)} in the catalogue); a running server "
         "answers with them from its next request")
    return {"added": len(rows), "items": len(grown), "ids": [i for i, _, _ in rows]}
