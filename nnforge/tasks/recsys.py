"""The recommender task: user-item interactions (and item text) in, ranked items out.

    nnforge train recsys --data path/to/ml-100k [--model two_tower | bpr | sasrec | popularity]
    run = nnforge.train("recsys", data="interactions.csv", items="items.csv", item_text_cols="title,genres")

build() reads the interactions (data/interactions.py), splits them as recommender research does
(data/interaction_splits.py: RecBole's per-user random split, or leave-last-out for the sequential model; a share of
the items held out entirely for the cold-start slice), embeds item text with the packaged MiniLM for a text-aware
model, and hands the engine the model with its step:

    bpr         BPR loss: each training pair against one uniformly drawn item the user has not interacted with
    two_tower   softmax over the positive and shared uniformly drawn items (or the batch's other positives, with
                the logQ correction for their popularity); the history the user tower reads leaves the positive out
    sasrec      the same softmax at every position of each user's most recent items: predict the next item
    popularity  nothing to learn: the counts are saved as a checkpoint like any model's (the own-loop path)

After every epoch every item is ranked for every user on the validation split (training items excluded):
val_ndcg@10 (the monitored metric by default), val_recall@10, val_mrr@10, val_hit@10. The run keeps
split.safetensors (what evaluation needs) and users.safetensors (the known users' histories, for serving);
evaluation (recsys_eval.py) writes the index, items.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnforge.config import ConfigError, RecsysConfig
from nnforge.data.catalogue import UserHistories
from nnforge.data.interaction_splits import PARTS, TRAIN, VALID, per_user, save_split, split_interactions
from nnforge.data.interactions import Interactions, read_interactions
from nnforge.engine.checkpoint import save_checkpoint
from nnforge.engine.distributed import world
from nnforge.engine.loop import StepContext, Trainable, checkpoint_tensors
from nnforge.engine.optim import OptimSpec
from nnforge.engine.run import Run
from nnforge.engine.seeding import derived_generator
from nnforge.evaluation.ranking import ranking_metrics
from nnforge.models import create_model, get_entry
from nnforge.models.recsys import BPRMF, RECSYS_ARGS, Popularity
from nnforge.tasks.base import Built
from nnforge.tasks.recsys_eval import MAX_K, evaluate_run, popularity_scores, score_fn

VALIDATION = ("ndcg@10", "recall@10", "mrr@10", "hit@10")  # logged as val_<name> after every epoch
HISTORY_POOL = 10  # a training history is drawn from the user's last HISTORY_POOL * max_history items


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def apply_recipe(cfg: RecsysConfig) -> list[str]:
    """The model's own defaults (its recipe) for every field the user left unset; what was chosen, to print."""
    recipe = get_entry(cfg.model).recipe or {}
    chosen = {k: v for k, v in recipe.items() if k in type(cfg).model_fields and k not in cfg.model_fields_set}
    for k, v in chosen.items():
        setattr(cfg, k, v)
    return [f"{cfg.model}'s recipe: " + ", ".join(f"{k} {v}" for k, v in chosen.items())] if chosen else []


# ----------------------------------------------------------------------------------------------------------------
# data


def read_data(cfg: RecsysConfig) -> Interactions:
    return read_interactions(cfg.data, cfg.items, user_col=cfg.user_col, item_col=cfg.item_col,
                             rating_col=cfg.rating_col, time_col=cfg.time_col, item_text_cols=cfg.item_text_cols,
                             item_title_col=cfg.item_title_col, min_rating=cfg.min_rating, log=_log)


def time_order(inter: Interactions) -> np.ndarray:
    """Each interaction's rank in time (file order breaks ties, and stands in without timestamps)."""
    n = len(inter)
    if inter.times is None:
        return np.arange(n, dtype=np.int64)
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), inter.times))] = np.arange(n)
    return rank


def split_data(cfg: RecsysConfig, inter: Interactions, run: Run) -> dict:
    """Split, and keep in the run what evaluation and serving need; returns the split's arrays and header."""
    cold_frac = cfg.cold_items
    if cold_frac and not inter.has_text:
        _log(f"cold_items {cold_frac}: no item text in the data, so no model could rank unseen items; none held out")
        cold_frac = 0.0
    part, cold = split_interactions(inter.users, inter.items, inter.times, cfg.split, cfg.split_ratios, cold_frac,
                                    cfg.seed)
    order = time_order(inter)
    header = {"protocol": cfg.split, "ratios": list(cfg.split_ratios), "seed": cfg.seed,
              "cold_items": cold.tolist(), "num_users": len(inter.user_ids), "num_items": len(inter.item_ids),
              "user_ids": inter.user_ids, "item_ids": inter.item_ids, "titles": inter.titles, "model": cfg.model}
    arrays = {"users": inter.users, "items": inter.items, "part": part, "order": order}
    save_split(run.path, arrays, header)
    indptr, flat = per_user(inter.users, inter.items, len(inter.user_ids), order)  # everything each user did
    UserHistories(inter.user_ids, indptr, flat).save(run.path)
    counts = {name: int((part == code).sum()) for name, code in PARTS.items()}
    run.write_json("data_report.json", {
        "data": str(cfg.data), "usable": len(inter), **inter.report,
        "counts": {name: {"interactions": n} for name, n in counts.items()},  # report.html's table of splits
        "split": {"protocol": cfg.split, **counts, "cold_items": len(cold)}})
    _log(f"split ({cfg.split}): {counts['train']} train, {counts['valid']} valid, {counts['test']} test"
         + (f", {counts['cold']} with {len(cold)} cold-start items held out" if len(cold) else ""))
    return {"part": part, "order": order, "cold": cold}


def csr(inter: Interactions, keep: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return per_user(inter.users[keep], inter.items[keep], len(inter.user_ids), order[keep])


# ----------------------------------------------------------------------------------------------------------------
# batches: everything random comes from (seed, epoch, batch), so a resumed run repeats exactly


def draw_negatives(pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor | None:
    """n items drawn uniformly from pool, shared by a batch (sampled softmax); all of them when n covers the pool
    (a full softmax); None for in-batch negatives (n = 0)."""
    if not n:
        return None
    if n >= len(pool):
        return pool.clone()
    return pool[torch.randint(len(pool), (n,), generator=g)]


class PairBatches:
    """(users, positives, negatives) for BPR: negatives uniform over the trainable items, none the user's own."""

    def __init__(self, users, items, negatives: np.ndarray, num_items: int, batch_size: int, seed: int, device):
        self.users, self.items = torch.from_numpy(users), torch.from_numpy(items)
        self.keys = np.sort(users * num_items + items)  # (user, item) pairs, for look-ups (numpy: 100x faster)
        self.pool = torch.from_numpy(negatives)
        self.num_items, self.bs, self.seed, self.device = num_items, batch_size, seed, device

    def __len__(self) -> int:
        return max(1, -(-len(self.users) // self.bs))

    def draw(self, users: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        neg = self.pool[torch.randint(len(self.pool), (len(users),), generator=g)]
        for _ in range(10):  # draw again where the user has the item; a few rounds leave almost none
            pair = (users * self.num_items + neg).numpy()
            clash = torch.from_numpy(self.keys[np.searchsorted(self.keys, pair).clip(max=len(self.keys) - 1)] == pair)
            if not clash.any():
                break
            neg[clash] = self.pool[torch.randint(len(self.pool), (int(clash.sum()),), generator=g)]
        return neg

    def epoch(self, epoch: int, start: int = 0):
        order = torch.randperm(len(self.users), generator=derived_generator(self.seed, epoch))
        for b in range(start, len(self)):
            idx = order[b * self.bs:(b + 1) * self.bs]
            users, items = self.users[idx], self.items[idx]
            neg = self.draw(users, derived_generator(self.seed, epoch, b + 1))
            yield users.to(self.device), items.to(self.device), neg.to(self.device)


class HistoryBatches:
    """(users, histories (B, L), positives, shared negatives or None): each training pair with the user's other
    training items (up to L, drawn at random from the most recent), the positive itself left out."""

    def __init__(self, users, items, train: tuple[np.ndarray, np.ndarray], max_len: int, negatives: np.ndarray,
                 num_negatives: int, batch_size: int, seed: int, device):
        indptr, flat = train
        width = max(1, min(int(np.diff(indptr).max(initial=1)), HISTORY_POOL * max_len))
        table = np.full((len(indptr) - 1, width), -1, np.int64)  # most recent `width` items, left-aligned
        for u in range(len(indptr) - 1):
            seq = flat[indptr[u]:indptr[u + 1]][-width:]
            table[u, :len(seq)] = seq
        self.table = torch.from_numpy(table)
        self.users, self.items = torch.from_numpy(users), torch.from_numpy(items)
        self.pool, self.num_negatives = torch.from_numpy(negatives), num_negatives
        self.max_len, self.bs, self.seed, self.device = max_len, batch_size, seed, device

    def __len__(self) -> int:
        return max(1, -(-len(self.users) // self.bs))

    def epoch(self, epoch: int, start: int = 0):
        order = torch.randperm(len(self.users), generator=derived_generator(self.seed, epoch))
        for b in range(start, len(self)):
            idx = order[b * self.bs:(b + 1) * self.bs]
            users, items = self.users[idx], self.items[idx]
            g = derived_generator(self.seed, epoch, b + 1)
            hist = self.table[users].clone()  # (B, width)
            hist[hist == items[:, None]] = -1
            if hist.shape[1] > self.max_len:  # L of the real entries at random, kept in time order
                keys = torch.rand(hist.shape, generator=g).masked_fill(hist < 0, -1.0)
                pick = keys.topk(self.max_len, dim=1).indices.sort(dim=1).values
                hist = hist.gather(1, pick)
            neg = draw_negatives(self.pool, self.num_negatives, g)
            yield (users.to(self.device), hist.to(self.device), items.to(self.device),
                   None if neg is None else neg.to(self.device))


class SequenceBatches:
    """(inputs (B, L), targets (B, L), shared negatives or None): each user's last L + 1 training items, right-
    aligned; position t predicts the item after it."""

    def __init__(self, train: tuple[np.ndarray, np.ndarray], max_len: int, negatives: np.ndarray,
                 num_negatives: int, batch_size: int, seed: int, device):
        from nnforge.data.interaction_splits import padded

        indptr, flat = train
        users = np.flatnonzero(np.diff(indptr) >= 2)  # a sequence needs an item to predict
        self.seqs = torch.from_numpy(padded(indptr, flat, users, max_len + 1))
        self.pool, self.num_negatives = torch.from_numpy(negatives), num_negatives
        self.bs, self.seed, self.device = batch_size, seed, device

    def __len__(self) -> int:
        return max(1, -(-len(self.seqs) // self.bs))

    def epoch(self, epoch: int, start: int = 0):
        order = torch.randperm(len(self.seqs), generator=derived_generator(self.seed, epoch))
        for b in range(start, len(self)):
            seqs = self.seqs[order[b * self.bs:(b + 1) * self.bs]]
            neg = draw_negatives(self.pool, self.num_negatives, derived_generator(self.seed, epoch, b + 1))
            yield (seqs[:, :-1].to(self.device), seqs[:, 1:].to(self.device),
                   None if neg is None else neg.to(self.device))


# ----------------------------------------------------------------------------------------------------------------
# steps


def bpr_step(models: dict[str, nn.Module], batch, ctx: StepContext) -> tuple[int, dict[str, torch.Tensor]]:
    users, pos, neg = batch
    m = models["model"]
    with ctx.autocast():
        u = m.user(users)
        diff = (u * (m.item(pos) - m.item(neg))).sum(-1)  # (B,) score of the positive minus the negative's
    loss = -F.logsigmoid(diff.float()).mean()
    ctx.update(loss)
    return len(users), {"loss": loss.detach(), "acc": (diff.detach() > 0).float().mean()}


def _vectors(m, idx: torch.Tensor, live: bool, history: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors of the distinct items among idx >= 0, where each entry of idx is among them; -1 stays -1): the
    scoring vectors of candidates, or (history) the vectors a user tower pools."""
    uniq, inv = torch.unique(idx.clamp(min=0), return_inverse=True)
    vecs = (m.history_vectors if history else m.item_vectors)(uniq, live=live)
    return vecs, torch.where(idx >= 0, inv, -1)


def _softmax_loss(u: torch.Tensor, pos: torch.Tensor, cand_vecs: torch.Tensor, pos_vecs: torch.Tensor,
                  neg: torch.Tensor | None, log_q: torch.Tensor | None) -> torch.Tensor:
    """u (P, D) against its positive pos_vecs (P, D) and the candidates: shared negatives (neg, cand_vecs) or, when
    neg is None, the other rows' positives (in-batch, logQ-corrected). Candidates equal to the positive are masked."""
    if neg is None:  # in-batch: row i's positive is column i
        logits = u @ pos_vecs.T - log_q[pos][None, :]
        same = (pos[:, None] == pos[None, :]) & ~torch.eye(len(pos), dtype=torch.bool, device=pos.device)
        logits = logits.masked_fill(same, -torch.inf)
        return F.cross_entropy(logits.float(), torch.arange(len(pos), device=pos.device))
    logits = torch.cat([(u * pos_vecs).sum(-1, keepdim=True), u @ cand_vecs.T], 1)  # (P, 1 + M)
    logits[:, 1:] = logits[:, 1:].masked_fill(neg[None, :] == pos[:, None], -torch.inf)
    return F.cross_entropy(logits.float(), torch.zeros(len(pos), dtype=torch.long, device=pos.device))


def softmax_step(models, batch, ctx: StepContext, log_q: torch.Tensor | None, live: bool):
    """two_tower: the user tower on the history, the item tower on the positive and the candidates."""
    users, hist, pos, neg = batch
    m = models["model"]
    with ctx.autocast():
        table, local = _vectors(m, hist, False, history=True)  # a fine-tuned tower: its cache, no gradient
        u = m.user_vectors(users, local, table)  # (B, D)
        cand = pos if neg is None else torch.cat([pos, neg])
        vecs, where = _vectors(m, cand, live)
        pos_vecs, cand_vecs = vecs[where[:len(pos)]], vecs[where[len(pos):]]
        loss = _softmax_loss(u, pos, cand_vecs, pos_vecs, neg, log_q)
    ctx.update(loss)
    return len(pos), {"loss": loss.detach()}


def sequence_step(models, batch, ctx: StepContext, log_q: torch.Tensor | None, live: bool):
    """sasrec: at every real position, the state predicts the next item."""
    x, y, neg = batch
    m = models["model"]
    with ctx.autocast():
        table, local = _vectors(m, x, False, history=True)
        states = m.sequence_states(local, table)  # (B, L, D)
        keep = (x >= 0) & (y >= 0)
        u, pos = states[keep], y[keep]  # (P, D), (P,)
        cand = pos if neg is None else torch.cat([pos, neg])
        vecs, where = _vectors(m, cand, live)
        loss = _softmax_loss(u, pos, vecs[where[len(pos):]], vecs[where[:len(pos)]], neg, log_q)
    ctx.update(loss)
    return int(keep.sum()), {"loss": loss.detach()}


# ----------------------------------------------------------------------------------------------------------------
# the task


def model_kwargs(cfg: RecsysConfig, inter: Interactions, resuming: bool) -> tuple[dict, dict, str | None]:
    """(arguments to build with, arguments the run records, the text encoder) for cfg.model."""
    clash = sorted(set(cfg.model_args) & RECSYS_ARGS)
    if clash:
        raise ConfigError(f"model_args: {', '.join(clash)} follow from the data and config; set them there instead")
    fixed: dict = {"num_users": len(inter.user_ids), "num_items": len(inter.item_ids), "text_dim": 0,
                   "max_len": cfg.max_history}
    source = None
    if inter.has_text:
        from nnforge.data.item_text import encoder_source
        from nnforge.models.text import encoder_config

        source = encoder_source(cfg.encoder)
        enc_cfg = encoder_config(source)
        fixed["text_dim"] = int(enc_cfg["hidden_size"])
        if cfg.fine_tune_text:
            fixed.update(fine_tune_text=True, encoder_config=enc_cfg, text_len=cfg.text_max_tokens)
    elif cfg.fine_tune_text:
        raise ConfigError("fine_tune_text: the data has no item text to fine-tune on (pass --items)")
    build = {**fixed, **cfg.model_args}
    if cfg.fine_tune_text and not resuming:
        build.update(encoder=source, pretrained=True)  # published weights to start from; the run keeps the config
    return build, {**fixed, **cfg.model_args}, source


def fill_text(model: nn.Module, cfg: RecsysConfig, inter: Interactions, source: str | None) -> None:
    """A text-aware model's item text: frozen sentence embeddings, or token ids for a fine-tuned encoder."""
    if not model.reads_text:
        return
    from nnforge.data.item_text import embed_texts, tokenize

    with torch.no_grad():
        if model.fine_tune_text:
            ids = tokenize(inter.texts, source, cfg.text_max_tokens)
            model.tokens.zero_()
            model.tokens[:, :ids.shape[1]] = torch.from_numpy(ids[:, :model.tokens.shape[1]])
            model.refresh_cache()
        else:
            model.text.copy_(torch.from_numpy(embed_texts(inter.texts, cfg.encoder, cfg.text_max_tokens)))


def _popularity_train(cfg, run: Run, model: Popularity, counts: np.ndarray, record: dict, validate) -> None:
    """popularity: count, validate once, and save best and last like a trained model (engine checkpoints)."""
    from dataclasses import asdict

    from nnforge.engine.loop import TrainState

    with torch.no_grad():  # the counts, equal ones in a seeded order (as the baseline every evaluation reports)
        model.counts.copy_(torch.from_numpy(popularity_scores(counts, cfg.seed)))
    val = validate({"model": model})
    state = TrainState(epoch=1, step=0, best=val.get(cfg.monitor), best_epoch=1)
    run.log_metrics({"epoch": 1, "step": 0, **val})
    tensors, extra = checkpoint_tensors({"model": model}, {})
    meta = dict(record, state=asdict(state), config=cfg.model_dump(mode="json"), task_state={}, **extra)
    save_checkpoint([run.checkpoint("best"), run.checkpoint("last")], tensors, meta)
    run.close()
    _log("popularity: counted " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))


class RecsysTask:
    name = "recsys"
    configs = {"recsys": RecsysConfig}

    def build(self, cfg: RecsysConfig, run: Run, device: torch.device) -> Built:
        if get_entry(cfg.model).task != "recsys":
            raise ConfigError(f"model '{cfg.model}' is not a recommender; see nnforge list-models --task recsys")
        if world().distributed:  # the steps call the towers' methods, which DDP's gradient averaging never sees
            raise ConfigError("recsys trains in one process; drop --nproc (several processes are not supported yet)")
        for note in apply_recipe(cfg):
            _log(note)
        resuming = run.checkpoint("last").is_file()
        inter = read_data(cfg)
        build, recorded, source = model_kwargs(cfg, inter, resuming)
        model = create_model(cfg.model, **build)
        fill_text(model, cfg, inter, source)
        split = split_data(cfg, inter, run)
        part, order = split["part"], split["order"]
        train_keep = part == TRAIN
        train = csr(inter, train_keep, order)
        valid = csr(inter, part == VALID, order)
        counts = np.bincount(inter.items[train_keep], minlength=len(inter.item_ids)).astype(np.float32)
        # negatives: every item but the cold-start ones, which no part of training may see
        negatives = np.setdiff1d(np.arange(len(inter.item_ids)), split["cold"])
        users = np.arange(len(inter.user_ids))
        max_len = cfg.max_history

        @torch.no_grad()
        def validate(models: dict[str, nn.Module]) -> dict[str, float]:
            m = models["model"]
            if m.fine_tune_text:
                m.refresh_cache()  # the checkpoint saved next serves these vectors
            result = ranking_metrics(score_fn(m, train, max_len, device), users, valid, train, len(inter.item_ids),
                                     ks=(10,))
            return {f"val_{k}": result[k] for k in VALIDATION}

        record = {"model": cfg.model, "model_kwargs": recorded, "module": "model", "task": self.name,
                  "io": {"verb": "recommend",
                         "input": {"kind": "history", "max_len": max_len, "num_items": len(inter.item_ids),
                                   "max_k": min(MAX_K, len(inter.item_ids))},
                         "output": {"kind": "items"}}}
        if model.reads_text and not model.fine_tune_text:  # the item tower also exports: text embedding -> vector
            record["io"]["graphs"] = {"item_tower": {"method": "text_vectors", "output": {"kind": "tensor"},
                                                     "input": {"kind": "tensor", "shape": [recorded["text_dim"]]}}}
        meta = {"data": str(cfg.data), "users": len(inter.user_ids), "items": len(inter.item_ids),
                "interactions": len(inter), "protocol": cfg.split, "cold_items": int(len(split["cold"])),
                "data_fingerprint": inter.report.get("fingerprint"), "text_encoder": cfg.encoder,
                "text_max_tokens": cfg.text_max_tokens, "item_text": inter.has_text}
        if isinstance(model, Popularity):
            model.to(device)
            return Built(None, {**meta, **record},
                         train=lambda resume: _popularity_train(cfg, run, model, counts, record, validate))
        directions = {f"val_{k}": "max" for k in VALIDATION}
        spec = OptimSpec.from_config(cfg)
        tr_users, tr_items = inter.users[train_keep], inter.items[train_keep]
        if isinstance(model, BPRMF):
            source = PairBatches(tr_users, tr_items, negatives, len(inter.item_ids), cfg.batch_size, cfg.seed, device)
            step = bpr_step
        else:
            live = model.fine_tune_text
            inbatch = cfg.negatives == "inbatch" or live
            if live and cfg.negatives != "inbatch":
                _log("fine_tune_text: in-batch negatives (the encoder runs on each batch's positives only)")
            n_neg = 0 if inbatch else min(cfg.num_negatives, len(negatives))
            log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum())).to(device) if inbatch else None
            if model.user_tower == "transformer":
                source = SequenceBatches(train, max_len, negatives, n_neg, cfg.batch_size, cfg.seed, device)
                step = lambda models, batch, ctx: sequence_step(models, batch, ctx, log_q, live)  # noqa: E731
            else:
                source = HistoryBatches(tr_users, tr_items, train, max_len, negatives, n_neg, cfg.batch_size,
                                        cfg.seed, device)
                step = lambda models, batch, ctx: softmax_step(models, batch, ctx, log_q, live)  # noqa: E731
        trainable = Trainable(modules={"model": model}, optimizers={"model": spec}, step=step, source=source,
                              validate=validate, directions=directions, meta=record)
        return Built(trainable, meta)

    def evaluate(self, run: Run | str | Path, data: str | None = None, device: str = "auto") -> dict:
        return evaluate_run(run.path if isinstance(run, Run) else run, data, device)


TASK = RecsysTask()
