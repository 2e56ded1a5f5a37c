"""The FAQ the bot falls back on: documents split into passages, searched by meaning and by words, fused.

    passages = read_faq(Path("faq/"))               # [{"doc", "title", "text"}], one per section of a page
    index = FaqIndex(passages, vectors)              # vectors: (N, D) from nnforge.load(run).embed, any scale
    index.search("how do I wash linen?", query_vector)   # [(score, passage)], best first

Markdown (`#` page title, `##` one passage per section) or plain text (one passage per paragraph); a section
longer than MAX_WORDS is cut at sentence ends. The score of a passage is W_EMBED * cosine (the classifier's own
features, so it knows the shop's vocabulary) + (1 - W_EMBED) * BM25, the BM25 divided by the most the query's
words could score, so both halves lie in [0, 1] and one threshold means the same for every query. A query word
no passage has counts against the match: nonsense scores near zero lexically.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

MAX_WORDS = 120  # a passage longer than this is cut at sentence ends: an answer should read in a few seconds
W_EMBED = 0.5  # weight of the cosine in the fused score (the rest: normalised BM25)
K1, B = 1.5, 0.75  # BM25's usual term-frequency saturation and length normalisation
SUFFIXES = ("ing", "ed", "es", "s")
# Words that carry no topic: questions are mostly made of them, and BM25's idf alone leaves them some weight.
STOP = set("a an and are am as at be been but by can could do does did for from had has have how i if in into is "
           "it its me my no not of on or our so than that the their them then there these they this to us was we "
           "what when where which who why will with would you your yours please about".split())
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+|[^\W_]+", re.UNICODE)


def _stem(word: str) -> str:
    for suffix in SUFFIXES:
        if len(word) > len(suffix) + 3 and word.endswith(suffix) and not word.endswith("ss"):
            return word[: -len(suffix)]
    return word


def tokens(text: str) -> list[str]:
    """Lower-cased words without stop words, crudely stemmed; a run of CJK characters gives its characters and
    their pairs (those scripts put no spaces between words)."""
    out = []
    for run in TOKEN.findall(text.lower()):
        if CJK.match(run):
            out += list(run) + [run[i:i + 2] for i in range(len(run) - 1)]
        elif run not in STOP:
            out.append(_stem(run.replace("'", "")))
    return out


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each section of a page; the text before any heading is a section of its own."""
    title, heading, body, out = "", "", [], []
    for line in text.splitlines():
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            if body:
                out.append((heading or title, " ".join(body)))
            body = []
            if len(m.group(1)) == 1 and not title:
                title = m.group(2).strip()
            else:
                heading = m.group(2).strip()
        elif line.strip():
            body.append(line.strip())
        elif body and not heading and not title:  # plain text: a blank line ends a paragraph
            out.append(("", " ".join(body)))
            body = []
    if body:
        out.append((heading or title, " ".join(body)))
    return [(h, b) for h, b in out if b]


def _chunks(body: str) -> list[str]:
    words = body.split()
    if len(words) <= MAX_WORDS:
        return [body]
    out, current = [], []
    for sentence in re.split(r"(?<=[.!?。！？])\s+", body):
        if current and len(" ".join(current + [sentence]).split()) > MAX_WORDS:
            out.append(" ".join(current))
            current = []
        current.append(sentence)
    return out + ([" ".join(current)] if current else [])


def read_faq(folder: str | Path) -> list[dict]:
    """Passages of every .md / .txt file under `folder`, in file-name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--faq {folder}: not a folder; expected a folder of .md or .txt files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".md", ".txt") and p.is_file())
    if not files:
        raise ValueError(f"--faq {folder}: no .md or .txt files in it")
    passages = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
        for heading, body in _sections(text):
            for chunk in _chunks(body):
                passages.append({"doc": str(path.relative_to(folder)), "title": heading, "text": chunk})
    if not passages:
        raise ValueError(f"--faq {folder}: its files hold no text")
    return passages


def passage_text(p: dict) -> str:
    """What is embedded and indexed: the heading (often the question itself) and the passage."""
    return f"{p['title']}. {p['text']}" if p["title"] else p["text"]


class FaqIndex:
    def __init__(self, passages: list[dict], vectors: np.ndarray | None):
        self.passages = passages
        self.vectors = None if vectors is None else _unit(np.asarray(vectors, dtype=np.float32))  # (N, D)
        docs = [tokens(passage_text(p)) for p in passages]
        self.tf = [Counter(d) for d in docs]
        self.length = np.array([max(1, len(d)) for d in docs], dtype=np.float64)
        self.avg = float(self.length.mean()) if len(docs) else 1.0
        df = Counter(t for d in docs for t in set(d))
        n = len(docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.unseen_idf = math.log(1 + (n + 0.5) / 0.5)  # a word no passage has: as rare as a word can be

    def bm25(self, query: str) -> np.ndarray:
        """(N,) BM25 of each passage divided by the most the query's words could score: in [0, 1]."""
        words = set(tokens(query))
        if not words:
            return np.zeros(len(self.passages))
        best = sum(self.idf.get(w, self.unseen_idf) for w in words) * (K1 + 1)
        norm = K1 * (1 - B + B * self.length / self.avg)  # (N,)
        scores = np.zeros(len(self.passages))
        for w in words:
            if w in self.idf:
                f = np.array([tf[w] for tf in self.tf], dtype=np.float64)
                scores += self.idf[w] * f * (K1 + 1) / (f + norm)
        return scores / best

    def scores(self, query: str, query_vector: np.ndarray | None) -> np.ndarray:
        lexical = self.bm25(query)
        if self.vectors is None or query_vector is None:
            return lexical
        cos = self.vectors @ _unit(np.asarray(query_vector, dtype=np.float32).reshape(1, -1))[0]
        return W_EMBED * np.clip(cos, 0.0, 1.0) + (1 - W_EMBED) * lexical

    def search(self, query: str, query_vector: np.ndarray | None, k: int = 3) -> list[tuple[float, dict]]:
        s = self.scores(query, query_vector)
        order = np.argsort(-s, kind="stable")[:k]
        return [(float(s[i]), self.passages[i]) for i in order]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
