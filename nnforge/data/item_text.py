"""Item texts -> sentence embeddings, with a pretrained encoder (the packaged all-MiniLM-L6-v2 unless one is named).

    vecs = embed_texts(["Toy Story. 1995. Animation Children's Comedy", "GoldenEye. 1995. Action"])   # (2, 384)

Mean pooling over real tokens, then L2 normalisation: how this encoder was trained to be used. Embeddings are cached
in $NNFORGE_CACHE/item_text/ under a digest of the encoder and the texts, so a second run over the same catalogue
reads them back instead of running the encoder. Long catalogues show progress.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from nnforge.data.cache import default_cache_dir
from nnforge.engine.checkpoint import atomic_write_bytes

DEFAULT_MAX_TOKENS = 64  # a title and its genres fit in 20; a description is cut here


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def encoder_source(encoder: str | None = None) -> str:
    """The encoder to read item text with: `encoder` (a Hugging Face name or folder), else the packaged MiniLM."""
    from nnforge.models.text import encoder_source as source

    return source("minilm", encoder)


def tokenize(texts: list[str], source: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> np.ndarray:
    """(N, T) int64 token ids of the encoder's own tokenizer, padded on the right with 0."""
    from nnforge.data.tokenizer import configure, pad_batch, pad_id_of, pretrained_tokenizer

    tok = configure(pretrained_tokenizer(source), max_tokens)
    pad = pad_id_of(tok)
    if pad != 0:
        raise ValueError(f"{source}: its padding id is {pad}; the item tower expects an encoder padding with 0")
    return pad_batch([np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(list(texts))], 0)


def _digest(texts: list[str], source: str, max_tokens: int) -> str:
    h = hashlib.sha256(f"{Path(source).name if Path(source).is_dir() else source}\0{max_tokens}\0".encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:24]


def embed_texts(texts: list[str], encoder: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                batch_size: int = 64, cache: bool = True, log=_log) -> np.ndarray:
    """(N, H) float32, each row L2-normalised: the sentence embedding of each text."""
    import torch
    import torch.nn.functional as F

    from nnforge.engine.progress import Progress
    from nnforge.models.text import load_encoder, masked_mean

    source = encoder_source(encoder)
    path = default_cache_dir() / "item_text" / f"{_digest(texts, source, max_tokens)}.npy"
    if cache and path.is_file():
        try:
            out = np.load(path, allow_pickle=False)  # never unpickles
            if out.shape[0] == len(texts):
                log(f"item text: {len(texts)} embeddings read from the cache ({path})")
                return out
        except (OSError, ValueError):
            pass  # a damaged cache entry: embed again
    ids = tokenize(texts, source, max_tokens)
    model = load_encoder(source, pretrained=True, config=None).eval()
    order = np.argsort([-int((r != 0).sum()) for r in ids], kind="stable")  # similar lengths share a batch
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    bar = Progress(len(texts), "item text", "text")
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            rows = order[s:s + batch_size]
            width = max(1, int((ids[rows] != 0).sum(1).max()))
            x = torch.from_numpy(ids[rows, :width])
            mask = x != 0
            h = model(input_ids=x, attention_mask=mask.long()).last_hidden_state
            out[rows] = F.normalize(masked_mean(h, mask), dim=-1).numpy()
            bar.update(len(rows))
    bar.close()
    log(f"item text: {len(texts)} texts embedded with {Path(source).name or source} ({out.shape[1]} dimensions)")
    if cache:
        import io

        buf = io.BytesIO()
        np.save(buf, out, allow_pickle=False)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as err:  # a read-only cache is no reason to stop
            log(f"item text: not cached ({err})")
    return out
