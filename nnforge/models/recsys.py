"""Recommenders: popularity, BPR matrix factorisation, and a two-tower model whose item tower reads the item's text.

    python -c "from nnforge.models import create_model as c; print(c('two_tower', num_users=9, num_items=50))"

Every recommender gives item vectors (N, D) and user vectors (B, D), and a score is their dot product, so one index
of item vectors serves them all (exact top-K, or FAISS). forward() reads a request row, the int64 layout of the
history input kind (nnforge/data/history_input.py):

    [k, flags, user, h_1 ... h_L]      user: its index, or -1; h: item indices, oldest first, -1 padding on the left

and returns the user vector (B, D); k and flags are for the answer (the items output kind), not for the towers.
History items the model was not trained with (indices >= num_items: added to the run later) are left out.

    popularity  every item scored by its training interactions: one user vector for everyone
    bpr         BPR-MF (Rendle et al. 2009): a user and an item embedding, one sampled negative per positive; a
                history without a known user is folded in as the mean of its items' vectors
    two_tower   item tower: the item's text embedding (all-MiniLM-L6-v2, frozen with a trained projection, or
                fine-tuned) plus an id embedding, in two versions as word2vec has ("in": what a history is made of,
                "out": what a user is scored against); user tower: the mean or an attention pooling of the history's
                "in" vectors (in training half of them dropped at random, ten always kept: a denoising tower, as
                Mult-DAE's input dropout), or a causal transformer. Both vectors are L2-normalised and the user's
                is divided by a temperature; with the item's bias a score is cosine / temperature + bias. Sampled
                softmax or in-batch negatives.
    sasrec      two_tower with the transformer user tower, trained to predict every next item (Kang & McAuley 2018)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnforge.models.registry import register_model
from nnforge.models.text import Block, load_encoder, masked_mean

DROPOUT_KEEPS = 10  # history items the denoising user tower never drops (TwoTower._drop_history)
ROW_USER, ROW_HISTORY = 2, 3  # columns of a request row (the history input kind writes the same layout)
# What the recsys task fills from the data; every recommender's builder takes them (and uses what it needs).
RECSYS_ARGS = frozenset({"num_users", "num_items", "text_dim", "max_len", "fine_tune_text", "encoder",
                         "encoder_config", "pretrained", "text_len"})


def _no_text(name: str, fine_tune_text: bool) -> None:
    if fine_tune_text:
        raise ValueError(f"{name} reads no item text, so there is nothing to fine-tune; fine_tune_text is for "
                         "two_tower and sasrec")


def _pool_mean(vecs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) bool -> (B, D): the mean over real entries (zeros for an empty history)."""
    return masked_mean(vecs, mask)


class Popularity(nn.Module):
    """Scores every item by how often it was interacted with in training; everyone gets the same list."""

    reads_text = fine_tune_text = False

    def __init__(self, num_items: int):
        super().__init__()
        self.num_items = num_items
        self.register_buffer("counts", torch.zeros(num_items))

    def item_vectors(self, idx: torch.Tensor | None = None) -> torch.Tensor:  # (N, 1): the share of the top item
        v = self.counts / self.counts.max().clamp_min(1.0)
        return (v if idx is None else v[idx])[..., None]

    def user_vectors(self, users: torch.Tensor, history: torch.Tensor, table=None) -> torch.Tensor:  # (B, 1)
        return torch.ones_like(history[:, :1], dtype=torch.float32)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.user_vectors(rows[:, ROW_USER], rows[:, ROW_HISTORY:])


class BPRMF(nn.Module):
    reads_text = fine_tune_text = False

    def __init__(self, num_users: int, num_items: int, dim: int = 64):
        super().__init__()
        self.num_items = num_items
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.xavier_normal_(self.user.weight)
        nn.init.xavier_normal_(self.item.weight)

    def item_vectors(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.item.weight if idx is None else self.item(idx)

    def user_vectors(self, users: torch.Tensor, history: torch.Tensor, table=None) -> torch.Tensor:
        n_users = self.user.num_embeddings
        known = (users >= 0) & (users < n_users)
        mask = (history >= 0) & (history < self.num_items)
        folded = _pool_mean(self.item(history.clamp(0, self.num_items - 1)), mask)  # (B, D)
        return torch.where(known[:, None], self.user(users.clamp(0, n_users - 1)), folded)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.user_vectors(rows[:, ROW_USER], rows[:, ROW_HISTORY:])


class TwoTower(nn.Module):
    def __init__(self, num_items: int, text_dim: int = 0, dim: int = 64, id_embedding: bool = True,
                 id_dropout: float = 0.0, user_tower: str = "mean", max_len: int = 50, depth: int = 2,
                 heads: int = 2, dropout: float = 0.1, temperature: float = 0.05, encoder: nn.Module | None = None,
                 text_len: int = 0, num_users: int = 0, user_embedding: bool = False, item_bias: bool = True,
                 tied: bool = False, history_dropout: float = 0.0):
        super().__init__()
        if user_tower not in ("mean", "attention", "transformer"):
            raise ValueError(f"user_tower {user_tower!r}: expected mean, attention or transformer")
        if not (text_dim or encoder is not None or id_embedding):
            raise ValueError("two_tower needs item text or an id embedding (the data has no item text: keep "
                             "id_embedding=true)")
        if not 0 <= history_dropout < 1:
            raise ValueError(f"history_dropout {history_dropout}: expected a share in [0, 1)")
        self.num_items, self.user_tower, self.temperature = num_items, user_tower, temperature
        self.id_dropout, self.history_dropout = id_dropout, history_dropout
        self.fine_tune_text = encoder is not None
        self.reads_text = bool(text_dim) or self.fine_tune_text
        if self.fine_tune_text:  # the encoder runs on each batch's candidates; the rest reads its last embeddings
            self.encoder = encoder
            if getattr(encoder, "pooler", None) is not None:
                encoder.pooler = None  # mean pooling leaves BERT's [CLS] pooler unused: no dead parameters
            text_dim = encoder.config.hidden_size
            self.register_buffer("tokens", torch.zeros(num_items, text_len, dtype=torch.long))
        if self.reads_text:  # sentence embeddings: frozen, or the fine-tuned encoder's latest (refresh_cache)
            self.register_buffer("text", torch.zeros(num_items, text_dim))
        # Two item vectors, as word2vec keeps two embeddings of a word: the one a history is made of ("in") and the
        # one a user is scored against ("out"); tied=True makes them one.
        self.text_out = nn.Linear(text_dim, dim) if self.reads_text else None
        self.id_out = nn.Embedding(num_items, dim) if id_embedding else None
        self.tied = tied
        if not tied:
            self.text_in = nn.Linear(text_dim, dim) if self.reads_text else None
            self.id_in = nn.Embedding(num_items, dim) if id_embedding else None
        for emb in (self.id_out, None if tied else self.id_in):
            if emb is not None:
                nn.init.zeros_(emb.weight)  # text first; an item never trained on keeps a zero id vector
        if user_tower == "attention":
            self.key = nn.Linear(dim, dim)
            self.query = nn.Parameter(torch.zeros(dim))
        if user_tower == "transformer":
            self.pos = nn.Embedding(max_len, dim)
            nn.init.normal_(self.pos.weight, std=0.02)
            self.blocks = nn.ModuleList(Block(dim, heads, 2, dropout) for _ in range(depth))
            self.ln = nn.LayerNorm(dim)
            self.drop = nn.Dropout(dropout)
        else:  # a small residual MLP: the user side need not live where the mean of its items does
            self.user_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        # SVD++'s shape: a known user's own vector added to the pooled history (a history alone serves anyone else)
        self.user_emb = nn.Embedding(num_users, dim) if user_embedding and user_tower != "transformer" else None
        if self.user_emb is not None:
            nn.init.zeros_(self.user_emb.weight)
        # how much an item is liked by anyone (popularity), as a last column: items [v, b], users [u, 1], so a
        # score stays a dot product (one index for every model) and equals cosine / temperature + b
        self.item_bias = nn.Embedding(num_items, 1) if item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)  # an item never trained on stays at 0

    # ---- the item tower ----
    def _scoring(self, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Item vectors (n, D) -> what a score multiplies: [v, b] with the bias column."""
        if self.item_bias is None:
            return v
        return torch.cat([v, bias if bias is not None else v.new_zeros(*v.shape[:-1], 1)], -1)

    def text_vectors(self, emb: torch.Tensor) -> torch.Tensor:
        """Pooled text embeddings (n, text_dim) -> scoring vectors of items added later: text alone, bias 0."""
        return self._scoring(F.normalize(self.text_out(emb), dim=-1), None)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Fine-tuned text: token ids (n, T), 0-padded -> (n, hidden) pooled and normalised, as text_vectors takes."""
        mask = ids != 0
        h = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return F.normalize(masked_mean(h, mask), dim=-1)

    def _vectors(self, idx: torch.Tensor, live: bool, side: str) -> torch.Tensor:
        """(n, D) L2-normalised "in" or "out" vectors of items idx. A fine-tuned encoder runs only when `live`
        (training's candidates); otherwise its embeddings from the last refresh_cache answer."""
        text, ids = (self.text_out, self.id_out) if side == "out" or self.tied else (self.text_in, self.id_in)
        v = 0
        if self.reads_text:
            v = text(self.encode_text(self.tokens[idx]) if self.fine_tune_text and live else self.text[idx])
        if ids is not None:
            e = ids(idx)
            if self.training and self.id_dropout > 0:  # some steps without the id: the text alone must do
                e = e * (torch.rand(e.shape[:-1] + (1,), device=e.device) >= self.id_dropout)
            v = v + e
        return F.normalize(v, dim=-1)

    def item_vectors(self, idx: torch.Tensor | None = None, live: bool = False) -> torch.Tensor:
        """(n, D [+ 1]) scoring vectors of items idx (all by default): the "out" vector, then the bias."""
        if idx is None:
            device = self.text.device if self.reads_text else self.id_out.weight.device
            idx = torch.arange(self.num_items, device=device)
        return self._scoring(self._vectors(idx, live, "out"), None if self.item_bias is None else self.item_bias(idx))

    def history_vectors(self, idx: torch.Tensor, live: bool = False) -> torch.Tensor:
        """(n, D) the "in" vectors of items idx: what a user tower pools."""
        return self._vectors(idx, live, "in")

    @torch.no_grad()
    def refresh_cache(self, batch: int = 256) -> None:
        """Fine-tuned text: every item's embedding through the current encoder, for histories and serving."""
        if not self.fine_tune_text:
            return
        was = self.training
        self.eval()  # no dropout in the vectors served
        for s in range(0, self.num_items, batch):
            idx = torch.arange(s, min(s + batch, self.num_items), device=self.text.device)
            self.text[idx] = self.encode_text(self.tokens[idx])
        self.train(was)

    # ---- the user tower ----
    def _history(self, history: torch.Tensor, table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (history >= 0) & (history < self.num_items)  # (B, L)
        h = history.clamp(0, self.num_items - 1)
        vecs = table[h] if table is not None else self.history_vectors(h.reshape(-1)).view(*h.shape, -1)
        return vecs * mask[..., None], mask

    def sequence_states(self, history: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer tower: (B, L) -> (B, L, D [+ 1]) user vectors after each position (left padding, causal).
        table: history vectors of the items the history names (training passes those of a batch)."""
        x, mask = self._history(history, table)
        L = history.shape[1]
        pos = torch.arange(L - 1, -1, -1, device=history.device)  # 0 = the most recent item
        x = self.drop(x + self.pos(pos))
        causal = torch.ones(L, L, dtype=torch.bool, device=history.device).tril()
        # each position sees the real items up to itself; a padding position only itself (a row with no key is NaN)
        keep = (causal & mask[:, None, :]) | torch.eye(L, dtype=torch.bool, device=history.device)
        for block in self.blocks:
            x = block(x, keep[:, None])
        return self._user(F.normalize(self.ln(x), dim=-1) / self.temperature)

    def _user(self, u: torch.Tensor) -> torch.Tensor:
        """User vectors (..., D) -> what a score multiplies: [u, 1] with the bias column."""
        return u if self.item_bias is None else torch.cat([u, u.new_ones(*u.shape[:-1], 1)], -1)

    def _drop_history(self, history: torch.Tensor) -> torch.Tensor:
        """A denoising user tower (Mult-DAE's input dropout): each history item left out with probability
        history_dropout, but DROPOUT_KEEPS items always stay: half of a 4-item history is noise, not a denoising
        task, while on ML-100k (85 training items a user on average) dropping half helps (BENCHMARKS.md)."""
        r = torch.rand(history.shape, device=history.device).masked_fill(history < 0, -1.0)
        kth = r.topk(min(DROPOUT_KEEPS, r.shape[1]), dim=1).values[:, -1:]  # the draws of the kept items are >= kth
        return history.masked_fill((r < self.history_dropout) & (r < kth), -1)

    def user_vectors(self, users: torch.Tensor, history: torch.Tensor, table: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """(B, D [+ 1]) from the history (B, L) and, with user_embedding, a known user's own vector (users: index or
        -1). table: history vectors of the items the history names (training passes those of a batch)."""
        if self.user_tower == "transformer":
            return self.sequence_states(history, table)[:, -1]
        if self.training and self.history_dropout > 0:
            history = self._drop_history(history)
        if self.user_tower == "mean" and table is not None:  # training: a bag of rows, 2-3x faster than gathering
            pad = table.shape[0]
            idx = torch.where((history >= 0) & (history < self.num_items), history, pad)
            pooled = F.embedding_bag(idx, torch.cat([table, table.new_zeros(1, table.shape[1])]), mode="mean",
                                     padding_idx=pad)
        else:
            vecs, mask = self._history(history, table)
            if self.user_tower == "attention":
                w = (self.key(vecs) @ self.query) / vecs.shape[-1] ** 0.5  # (B, L)
                w = torch.softmax(w.masked_fill(~mask, -1e9), 1) * mask
                pooled = (w[..., None] * vecs).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-9)
            else:
                pooled = _pool_mean(vecs, mask)
        if self.user_emb is not None:
            n = self.user_emb.num_embeddings
            known = ((users >= 0) & (users < n))[:, None]
            pooled = pooled + self.user_emb(users.clamp(0, n - 1)) * known
        return self._user(F.normalize(pooled + self.user_mlp(pooled), dim=-1) / self.temperature)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.user_vectors(rows[:, ROW_USER], rows[:, ROW_HISTORY:])


# ----------------------------------------------------------------------------------------------------------------
# registered recommenders: the data args are the same for all (RECSYS_ARGS); the rest are options (model_args)


def _text_encoder(fine_tune_text: bool, encoder: str | None, encoder_config: dict | None, pretrained: bool):
    """The sentence encoder of a fine-tuned item tower (pretrained weights when training starts), or None."""
    return load_encoder(encoder, pretrained, encoder_config) if fine_tune_text else None


@register_model("popularity", task="recsys", data_args=RECSYS_ARGS)
def popularity(num_users: int, num_items: int, text_dim: int = 0, max_len: int = 50, fine_tune_text: bool = False,
               encoder: str | None = None, encoder_config: dict | None = None, pretrained: bool = False,
               text_len: int = 0):
    """Most interacted items first, the same for everyone: the baseline every paper reports."""
    _no_text("popularity", fine_tune_text)
    return Popularity(num_items)


@register_model("bpr", task="recsys", data_args=RECSYS_ARGS,
                recipe={"batch_size": 2048, "lr": 1e-3, "epochs": 300, "early_stop": 10})
def bpr(num_users: int, num_items: int, text_dim: int = 0, max_len: int = 50, fine_tune_text: bool = False,
        encoder: str | None = None, encoder_config: dict | None = None, pretrained: bool = False, text_len: int = 0,
        dim: int = 64):
    """BPR matrix factorisation: user and item embeddings, pairwise loss with sampled negatives."""
    _no_text("bpr", fine_tune_text)
    return BPRMF(num_users, num_items, dim)


@register_model("two_tower", task="recsys", data_args=RECSYS_ARGS,
                recipe={"batch_size": 512, "lr": 1e-3, "epochs": 100, "early_stop": 10, "max_history": 500})
def two_tower(num_users: int, num_items: int, text_dim: int = 0, max_len: int = 50, fine_tune_text: bool = False,
              encoder: str | None = None, encoder_config: dict | None = None, pretrained: bool = False,
              text_len: int = 0, dim: int = 64, id_embedding: bool = True, id_dropout: float = 0.0,
              user_tower: str = "mean", user_embedding: bool = False, item_bias: bool = True, tied: bool = False,
              depth: int = 2, heads: int = 2, dropout: float = 0.1, temperature: float = 0.05,
              history_dropout: float = 0.5):
    """Text-aware two-tower: MiniLM item text (+ id), user = pooled history; sampled softmax."""
    return TwoTower(num_items, text_dim, dim, id_embedding, id_dropout, user_tower, max_len, depth, heads, dropout,
                    temperature, _text_encoder(fine_tune_text, encoder, encoder_config, pretrained), text_len,
                    num_users, user_embedding, item_bias, tied, history_dropout)


@register_model("sasrec", task="recsys", data_args=RECSYS_ARGS,
                recipe={"batch_size": 128, "lr": 1e-3, "epochs": 200, "early_stop": 20, "max_history": 50,
                        "split": "leave_last_out"})
def sasrec(num_users: int, num_items: int, text_dim: int = 0, max_len: int = 50, fine_tune_text: bool = False,
           encoder: str | None = None, encoder_config: dict | None = None, pretrained: bool = False,
           text_len: int = 0, dim: int = 64, id_embedding: bool = True, id_dropout: float = 0.0,
           item_bias: bool = True, tied: bool = False, depth: int = 2, heads: int = 2, dropout: float = 0.2,
           temperature: float = 0.05):
    """Sequential: a causal transformer over the history (SASRec) on the text-aware item tower; next-item loss."""
    return TwoTower(num_items, text_dim, dim, id_embedding, id_dropout, "transformer", max_len, depth, heads,
                    dropout, temperature, _text_encoder(fine_tune_text, encoder, encoder_config, pretrained),
                    text_len, item_bias=item_bias, tied=tied)
