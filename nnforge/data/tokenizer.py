"""Tokenizers for text runs: train one on the training split, or take a pretrained encoder's; save, reload, pad.

    tok = train_tokenizer(texts, kind="bpe", vocab_size=8000)      # [PAD] = 0, [UNK] = 1
    tok.save("runs/text/exp1/tokenizer.json"); tok = load_tokenizer("runs/text/exp1/tokenizer.json", max_len=128)
    ids = pad_batch([np.array(e.ids) for e in tok.encode_batch(["a text", "another one"])], pad_id=0)   # (B, T)

Everything here is Hugging Face `tokenizers` (Rust): the saved tokenizer.json holds the normalizer, the vocabulary
and the truncation length, so a run folder re-tokenizes exactly as it trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nnforge.data.ngrams import NgramTokenizer, is_ngram_file

PAD, UNK = "[PAD]", "[UNK]"  # ids 0 and 1 in every tokenizer trained here
KINDS = ("bpe", "wordpiece", "ngrams")


def train_tokenizer(texts: list[str], kind: str = "bpe", vocab_size: int = 8000, lowercase: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
    """A new tokenizer fitted to `texts`; the same texts always give the same ids.

    bpe: byte-level BPE (GPT-2 style): no unknown tokens, and decode(encode(t)) gives t back after normalisation.
    wordpiece: BERT-style word pieces split at whitespace and punctuation; unseen characters become [UNK].
    ngrams: hashed word and character n-grams (nnforge/data/ngrams.py), vocab_size - 1 buckets; nothing is learnt.
    CJK characters are words of their own in all three.
    """
    if kind == "ngrams":  # hashed n-grams: nothing to learn from the texts
        return NgramTokenizer(buckets=vocab_size - 1, lowercase=lowercase)
    # CJK characters become words of their own (BERT's basic tokenizer does the same): those scripts put no spaces
    # between words, and without this a whole paragraph would be one pre-token, cut into arbitrary pieces.
    cjk = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    one_space = normalizers.Replace(Regex(" {2,}"), " ")  # the spaces put around neighbouring characters, once
    norm = normalizers.Sequence([normalizers.NFKC(), cjk, one_space]
                                + ([normalizers.Lowercase()] if lowercase else []))
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = norm
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    elif kind == "wordpiece":
        # The library's WordPiece trainer breaks ties between equally frequent merges in hash order (its '##'
        # pieces are numbered as met), so two trainings on the same texts differ. A BPE without the prefix is
        # deterministic; each of its pieces, as a word start and as a '##' continuation, makes the vocabulary.
        bpe = Tokenizer(models.BPE(unk_token=UNK))
        bpe.normalizer = norm
        bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        bpe.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=max(vocab_size // 2, 4), min_frequency=min_frequency, special_tokens=[PAD, UNK],
            show_progress=False))
        pieces = sorted(t for t in bpe.get_vocab() if t not in (PAD, UNK))
        vocab = [PAD, UNK, *pieces, *("##" + p for p in pieces)]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
        tok.normalizer = norm
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    else:
        raise ValueError(f"tokenizer: expected one of {KINDS}, got {kind!r}")
    assert tok.token_to_id(PAD) == 0, "the padding id must be 0"
    return tok


def pretrained_tokenizer(source: str | Path) -> Tokenizer:
    """A pretrained encoder's tokenizer: `source` is a folder holding tokenizer.json, or a Hugging Face name."""
    p = Path(source)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{p}: no tokenizer.json (a fast tokenizer file) in the encoder folder")
        return Tokenizer.from_file(str(p / "tokenizer.json"))
    return Tokenizer.from_pretrained(str(source))  # downloads once into the Hugging Face cache


def pad_id_of(tok: Tokenizer) -> int:
    """The id used for padding: the tokenizer's own padding setting, else its [PAD] / <pad> token."""
    if tok.padding is not None:
        return int(tok.padding["pad_id"])
    for name in (PAD, "<pad>"):
        if (i := tok.token_to_id(name)) is not None:
            return i
    raise ValueError("the tokenizer has no padding token ([PAD] or <pad>); nnforge needs one to batch texts")


def configure(tok: Tokenizer, max_len: int) -> Tokenizer:
    """Cut at max_len tokens (special tokens included) and never pad: batches pad to their longest text."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def load_tokenizer(path: str | Path, max_len: int) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer file missing; a text run keeps its tokenizer.json in the run folder")
    text = p.read_text(encoding="utf-8")
    tok = NgramTokenizer.from_str(text) if is_ngram_file(text) else Tokenizer.from_str(text)
    return configure(tok, max_len)


def pad_batch(seqs: list[np.ndarray], pad_id: int = 0) -> np.ndarray:
    """int64 (B, T_max), padded on the right with pad_id; each text's length is (row != pad_id).sum()."""
    width = max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), max(width, 1)), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out
