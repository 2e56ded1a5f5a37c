"""Top-K ranking metrics under full ranking (every item ranked for every user, no sampled negatives), as RecBole
computes them, and their picture.

    result = ranking_metrics(score_fn, users, positives, exclude, num_items, ks=(5, 10, 20))
    result["ndcg@10"], result["recall@10"], result["coverage@10"], result["users"]

A user's excluded items (those seen in training) cannot be recommended; ranks count from 1. With P the user's
positive items and the hits among the top K:

    recall@K      |hits| / |P|
    precision@K   |hits| / K
    hit@K         1 when there is a hit
    mrr@K         1 / the rank of the first hit (0 without one)
    ndcg@K        sum over hits of 1 / log2(rank + 1), over the same sum for the ideal list (min(|P|, K) hits first)

each averaged over the users with at least one positive; coverage@K is the share of the catalogue (or of the
allowed items) found in at least one user's top K.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

METRICS = ("recall", "ndcg", "mrr", "hit", "precision")
CSR = tuple[np.ndarray, np.ndarray]  # (indptr (U + 1,), items): row u is items[indptr[u]:indptr[u + 1]]


def _rows(csr: CSR, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row number within `users`, item) of every entry of those users."""
    indptr, items = csr
    starts, ends = indptr[users], indptr[users + 1]
    counts = ends - starts
    rows = np.repeat(np.arange(len(users)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, items[np.repeat(starts, counts) + offsets]


def ranking_metrics(score_fn: Callable[[np.ndarray], torch.Tensor], users: np.ndarray, positives: CSR,
                    exclude: CSR | None, num_items: int, ks: tuple[int, ...] = (5, 10, 20),
                    allowed: np.ndarray | None = None, chunk: int = 1024) -> dict:
    """Mean metrics over `users` that have positives. score_fn(user chunk) -> (b, num_items) scores; allowed: a
    (num_items,) bool mask of the items that may be ranked at all (e.g. only cold items)."""
    users = np.asarray(users, np.int64)
    users = users[np.diff(positives[0])[users] > 0]
    kmax = min(max(ks), num_items)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in METRICS}
    covered = {k: np.zeros(num_items, bool) for k in ks}
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))  # rank 1 -> 1, rank 2 -> 0.63, ...
    ideal = torch.cumsum(discount, 0)
    blocked = torch.from_numpy(~allowed) if allowed is not None else None
    for s in range(0, len(users), chunk):
        part = users[s:s + chunk]
        scores = score_fn(part).detach().float().cpu().clone()  # (b, N)
        if exclude is not None:
            r, i = _rows(exclude, part)
            scores[torch.from_numpy(r), torch.from_numpy(i)] = -torch.inf
        if blocked is not None:
            scores[:, blocked] = -torch.inf
        values, top = torch.topk(scores, kmax, dim=1)  # (b, kmax), best first
        is_pos = torch.zeros_like(scores, dtype=torch.bool)
        r, i = _rows(positives, part)
        is_pos[torch.from_numpy(r), torch.from_numpy(i)] = True
        hits = is_pos.gather(1, top) & torch.isfinite(values)  # an excluded item never counts
        n_pos = torch.from_numpy(np.diff(positives[0])[part]).double()
        for k in ks:
            kk = min(k, kmax)
            h = hits[:, :kk]
            n_hit = h.sum(1).double()
            first = torch.where(h.any(1), h.double().argmax(1) + 1.0, torch.inf)
            dcg = (h.double() * discount[:kk]).sum(1)
            idcg = ideal[(n_pos.clamp(max=kk) - 1).long()]
            sums[f"recall@{k}"] += (n_hit / n_pos).sum().item()
            sums[f"precision@{k}"] += (n_hit / k).sum().item()
            sums[f"hit@{k}"] += (n_hit > 0).double().sum().item()
            sums[f"mrr@{k}"] += (1.0 / first).sum().item()
            sums[f"ndcg@{k}"] += (dcg / idcg).sum().item()
            shown = top[:, :kk][torch.isfinite(values[:, :kk])]
            covered[k][shown.numpy()] = True
    n = max(1, len(users))
    out: dict = {"users": int(len(users))}
    out.update({name: total / n for name, total in sums.items()})
    pool = int(allowed.sum()) if allowed is not None else num_items
    out.update({f"coverage@{k}": float(covered[k].sum()) / max(1, pool) for k in ks})
    return out


def plot_ranking(results: dict[str, dict[str, dict]], ks: tuple[int, ...], path: str | Path) -> Path:
    """One panel per (slice, metric) of recall and NDCG against K, one line per model: results[slice][model]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(name, m) for name, by_model in results.items() if by_model for m in ("recall", "ndcg")]
    fig = Figure(figsize=(3.2 * max(1, len(panels)), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (slice_name, metric) in zip(axes, panels, strict=False):
        for model, r in results[slice_name].items():
            ax.plot(ks, [r.get(f"{metric}@{k}", np.nan) for k in ks], marker="o", label=model)
        ax.set_title(f"{slice_name}: {metric}@K", fontsize=9)
        ax.set_xlabel("K")
        ax.set_xticks(list(ks))
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    if panels:
        axes[0].legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, format="png", facecolor="white")
    return path
