"""Hashed word and character n-grams: the features of the fasttext model, as a tokenizer.

    tok = NgramTokenizer(buckets=2**18)                 # nothing to train: the hash is the vocabulary
    ids = [e.ids for e in tok.encode_batch(["a great film", "一部好电影"])]    # ids in 1..buckets; 0 is padding
    tok.save("runs/text/exp1/tokenizer.json"); tok = NgramTokenizer.from_file(...)

A text becomes its words (runs of letters and digits; each CJK character is a word of its own, as in BERT's basic
tokenizer, since those scripts put no spaces between words), the pairs of neighbouring words, and the character
3- to 5-grams of each word with boundary marks ("<film>" -> "<fi", "fil", ..., "lm>"), each hashed into a fixed
number of buckets (Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification"). Unseen words still
share character n-grams with seen ones, and a word order signal comes from the pairs. The hash is CRC-32 of the
UTF-8 feature: the same text gives the same ids on every machine and in every process.

It offers the part of the Hugging Face `tokenizers` interface nnforge's text data and input kind use (encode,
encode_batch, get_vocab_size, token_to_id, save, to_str, truncation), so a run keeps it in tokenizer.json.
"""

from __future__ import annotations

import json
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "nnforge-ngrams"
# Han, Hiragana/Katakana, Hangul: scripts written without spaces between words.
CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")
WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Encoding:
    ids: list[int]
    overflowing: list = field(default_factory=list)  # non-empty when max_len cut the text (as in `tokenizers`)


class NgramTokenizer:
    def __init__(self, buckets: int = 2**18, word_ngrams: int = 2, char_ngrams: tuple[int, int] = (3, 5),
                 lowercase: bool = True, max_len: int = 1024):
        self.buckets, self.word_ngrams, self.char_ngrams = int(buckets), int(word_ngrams), tuple(char_ngrams)
        self.lowercase, self.max_len = bool(lowercase), int(max_len)

    # --- the features -----------------------------------------------------------------------------------------
    def words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text)
        text = CJK.sub(r" \1 ", text.lower() if self.lowercase else text)
        return WORD.findall(text)

    def features(self, text: str) -> list[str]:
        words = self.words(text)
        out = [f"w:{w}" for w in words]
        for n in range(2, self.word_ngrams + 1):
            out += [f"w{n}:" + " ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        lo, hi = self.char_ngrams
        for w in words:
            marked = f"<{w}>"
            if len(w) == 1:  # a single character (a CJK word): its own word feature says it all
                continue
            out += [f"c:{marked[i:i + n]}" for n in range(lo, hi + 1) for i in range(len(marked) - n + 1)]
        return out

    def _id(self, feature: str) -> int:
        return zlib.crc32(feature.encode("utf-8")) % self.buckets + 1  # 0 stays free for padding

    # --- the tokenizers interface ---------------------------------------------------------------------------
    def encode(self, text: str) -> Encoding:
        ids = [self._id(f) for f in self.features(text)]
        return Encoding(ids[:self.max_len], ids[self.max_len:])

    def encode_batch(self, texts: list[str]) -> list[Encoding]:
        return [self.encode(t) for t in texts]

    def get_vocab_size(self) -> int:
        return self.buckets + 1

    def token_to_id(self, token: str) -> int | None:
        return 0 if token == "[PAD]" else None

    def id_to_token(self, i: int) -> str:
        return "[PAD]" if i == 0 else f"#{i}"  # a hash has no inverse: the doctor's batch table shows bucket numbers

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.id_to_token(i) for i in ids)

    def enable_truncation(self, max_len: int) -> None:
        self.max_len = int(max_len)

    def no_padding(self) -> None:
        pass  # batches pad to their longest text, as with every nnforge tokenizer

    @property
    def padding(self) -> dict:
        return {"pad_id": 0}

    def to_str(self) -> str:
        return json.dumps({"format": FORMAT, "buckets": self.buckets, "word_ngrams": self.word_ngrams,
                           "char_ngrams": list(self.char_ngrams), "lowercase": self.lowercase})

    def save(self, path: str) -> None:
        Path(path).write_text(self.to_str())

    @classmethod
    def from_str(cls, text: str) -> NgramTokenizer:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"not an nnforge n-gram tokenizer (format {d.get('format')!r})")
        buckets = d.get("buckets")
        if not isinstance(buckets, int) or not 1 <= buckets <= 2**24:  # a run folder is data: bound what sizes things
            raise ValueError(f"n-gram tokenizer: buckets={buckets!r}; expected a whole number from 1 to {2**24}")
        return cls(buckets, int(d.get("word_ngrams", 2)), tuple(d.get("char_ngrams", (3, 5))),
                   bool(d.get("lowercase", True)))


def is_ngram_file(text: str) -> bool:
    return text.lstrip().startswith("{") and f'"format": "{FORMAT}"' in text[:200]
