"""Topics of a headline: company and sector keyword lists from a YAML file, plus similarity to each topic's
description in the embedding of an nnforge text run.

    topics = read_topics(Path("topics.yaml"))
    tagger = Tagger(topics, embed=nnforge.load(run).embed)     # embed: texts -> (N, D); None: keywords only
    tagger.tag(["Ryanair cuts 3,000 jobs"])                    # [["all", "airlines", "jobs"]]

    topics:
      airlines:
        keywords: [airline, Ryanair, easyJet, "British Airways", aviat*]   # whole words, any case; * ends a prefix
        description: airlines, flights and air travel                      # optional: tags by meaning too
    similarity: 0.6     # cosine a headline needs to a description (default 0.6)

Every item also belongs to the topic "all". By meaning, an item joins at most one topic: the one whose
description is nearest, if it is at least `similarity` near (a headline near every description is near none in
particular). The embedding is that of the run given (`--topic-model`, default the sentiment model): a sentence
encoder (a MiniLM run) places headlines by subject; a model trained only for sentiment places them by mood, so
give it a high `similarity` or no descriptions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnforge.apps._yaml import AppFileError, Located, read_yaml

ALL = "all"
DEFAULT_SIMILARITY = 0.6
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ &.-]{0,63}")
TOPIC_KEYS = {"keywords": "words or phrases that mark the topic", "description": "a sentence about the topic, "
              "matched by meaning"}


@dataclass
class Topic:
    name: str
    keywords: list[str]
    description: str
    pattern: re.Pattern | None


def _pattern(keywords: list[str]) -> re.Pattern | None:
    parts = []
    for k in keywords:
        k = k.strip()
        prefix = k.endswith("*")
        body = r"\s+".join(re.escape(w) for w in k.rstrip("*").split())
        parts.append(body + (r"\w*" if prefix else "") + r"(?!\w)")
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + ")", re.IGNORECASE) if parts else None


def read_topics(path: str | Path) -> tuple[list[Topic], float]:
    """(topics, similarity threshold) of a topics file; AppFileError names the line of any mistake."""
    path = Path(path)
    data, lines = read_yaml(path)
    loc = Located(path, lines)
    top = loc.mapping(data, (), {"topics": "NAME: {keywords, description}",
                                 "similarity": "the cosine a text needs to a description"}, required=("topics",))
    similarity = top.get("similarity", DEFAULT_SIMILARITY)
    if isinstance(similarity, bool) or not isinstance(similarity, int | float) or not -1 <= similarity <= 1:
        raise loc.error(("similarity",), f"similarity is {similarity!r}; expected a number between -1 and 1")
    raw = top["topics"]
    if not isinstance(raw, dict) or not raw:
        raise loc.error(("topics",), "topics must be a mapping of NAME: {keywords: [...], description: ...}")
    topics = []
    for name, spec in raw.items():
        key = ("topics", name)
        if not isinstance(name, str) or not NAME.fullmatch(name) or name == ALL:
            why = "is reserved (every item is in it)" if name == ALL else "must be letters, digits, spaces, _ & . -"
            raise loc.error(key, f"topic name '{name}' {why}")
        loc.mapping(spec, key, TOPIC_KEYS)
        keywords = loc.texts(spec.get("keywords"), (*key, "keywords"), at_least=0)
        description = loc.text(spec.get("description", ""), (*key, "description"), empty=True).strip()
        if not keywords and not description:
            raise loc.error(key, f"topic '{name}' has neither keywords nor a description; give at least one")
        for i, k in enumerate(keywords):
            if not k.rstrip("*").strip() or "*" in k.rstrip("*"):
                raise loc.error((*key, "keywords", i), f"keyword '{k}': expected a word or phrase, with * only at "
                                                       "its end (a prefix)")
        topics.append(Topic(name, keywords, description, _pattern(keywords)))
    return topics, float(similarity)


class Tagger:
    def __init__(self, topics: list[Topic], similarity: float = DEFAULT_SIMILARITY, embed=None):
        self.topics, self.similarity, self.embed = topics, similarity, embed
        self.described = [t for t in topics if t.description] if embed is not None else []
        self.vectors = _unit(embed([t.description for t in self.described])) if self.described else None  # (T, D)

    @property
    def names(self) -> list[str]:
        return [ALL] + [t.name for t in self.topics]

    def tag(self, texts: list[str]) -> list[list[str]]:
        tags = [[ALL] + [t.name for t in self.topics if t.pattern is not None and t.pattern.search(text)]
                for text in texts]
        if self.vectors is not None and texts:
            sims = _unit(self.embed(texts)) @ self.vectors.T  # (N, T) cosines
            best = sims.argmax(1)
            for row, s, k in zip(tags, sims, best, strict=True):
                name = self.described[k].name
                if s[k] >= self.similarity and name not in row:
                    row.append(name)
        return tags


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


__all__ = ["ALL", "AppFileError", "Tagger", "Topic", "read_topics"]
