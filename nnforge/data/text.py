"""Text classification data: read labelled texts, check every row, split, tokenize, and serve padded batches.

    data = TextData.load(TextTrainConfig(data="reviews.csv"))   # prints what it found, skipped and split
    source = data.train_source(device)                          # yields (ids (B, T) int64, labels (B,)) batches

Inputs: a CSV, TSV or JSON Lines file with a text column and a label column, or a folder holding train.* and
optionally val.* / test.* files. Encodings: UTF-8 (with or without a BOM), UTF-16 with a BOM, else Latin-1
(Windows-1252 when its curly quotes and dashes appear). Malformed rows, empty texts and missing labels are
skipped and reported with their line numbers; the files are only read. Val/test are carved from train with a
seeded stratified split that keeps identical texts together, so a duplicated text cannot leak across splits.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnforge.config import TextTrainConfig
from nnforge.data.cache import fingerprint_files
from nnforge.data.rules import (
    DataError,
    assign_splits,
    check_classes,
    epoch_order,
    find_duplicates,
    joined_keys,
    log_problems,
    normalise_labels,
    split_counts,
    split_name,
)
from nnforge.data.tables import read_table, read_text_file
from nnforge.data.text_input import TOKENIZER_FILE
from nnforge.data.tokenizer import (
    configure,
    load_tokenizer,
    pad_batch,
    pad_id_of,
    pretrained_tokenizer,
    train_tokenizer,
)
from nnforge.engine.seeding import derived_generator

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
BUCKET = 32  # batches per length-sorted bucket: batches pad little, their order stays random


@dataclass
class Row:
    text: str
    label: str
    where: str  # "file:LINE", for every message about this row
    split: str  # train | val | test
    group: str | None = None  # the --group-col value: val/test take whole groups


# --------------------------------------------------------------------------------------------------------------
# reading files


def _format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected one of {', '.join(FORMATS)}")
    return fmt


def _check_row(text, label, where: str, split: str, rows: list[Row], skipped: list[dict], group=None) -> None:
    if label is None or (isinstance(label, str) and not label.strip()):
        skipped.append({"path": where, "reason": "missing label"})
    elif not isinstance(label, str | int | float | bool):
        skipped.append({"path": where, "reason": f"label must be a string or number, got {type(label).__name__}"})
    elif text is None:
        skipped.append({"path": where, "reason": "missing text"})
    elif not isinstance(text, str):
        skipped.append({"path": where, "reason": f"text must be a string, got {type(text).__name__}"})
    elif not text.strip():
        skipped.append({"path": where, "reason": "empty text"})
    elif "\x00" in text:
        skipped.append({"path": where, "reason": "NUL byte in the text (binary data, or UTF-16 read as 8-bit?)"})
    else:
        group = None if group is None or not str(group).strip() else str(group).strip()
        rows.append(Row(text.strip(), str(label).strip(), where, split, group))


def _read_delimited(path: Path, delimiter: str, text_col: str, label_col: str, split: str, rows: list[Row],
                    skipped: list[dict], group_col: str | None = None) -> str:
    required = {text_col: "--text-col", label_col: "--label-col"} | ({group_col: "--group-col"} if group_col else {})
    table = read_table(path, delimiter, required, label=label_col)
    ti, li = table.columns[text_col], table.columns[label_col]
    gi = table.columns[group_col] if group_col else None
    for line, rec in table.rows:
        _check_row(rec[ti], rec[li], f"{path}:{line}", split, rows, skipped, None if gi is None else rec[gi])
    skipped += table.skipped
    return table.encoding


def _read_jsonl(path: Path, content: str, text_col: str, label_col: str, split: str, rows: list[Row],
                skipped: list[dict], group_col: str | None = None) -> None:
    if content.lstrip().startswith("["):
        raise DataError(f"{path}: a JSON array; expected JSON Lines (one object per line)")
    # split("\n"), not splitlines(): Latin-1 text may hold U+0085, which splitlines() would take for a line end
    for n, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            skipped.append({"path": where, "reason": f"malformed JSON ({err.msg} at column {err.colno})"})
            continue
        if not isinstance(obj, dict):
            skipped.append({"path": where, "reason": f"expected a JSON object, got {type(obj).__name__}"})
            continue
        _check_row(obj.get(text_col), obj.get(label_col), where, split, rows, skipped,
                   obj.get(group_col) if group_col else None)


def read_file(path: Path, text_col: str, label_col: str, split: str = "train",
              group_col: str | None = None) -> tuple[list[Row], list[dict], str]:
    """(usable rows, skipped rows with reasons, encoding) of one CSV/TSV/JSONL file."""
    fmt = _format_of(path)
    rows: list[Row] = []
    skipped: list[dict] = []
    if fmt == "jsonl":
        content, encoding = read_text_file(path)
        _read_jsonl(path, content, text_col, label_col, split, rows, skipped, group_col)
    else:
        encoding = _read_delimited(path, "\t" if fmt == "tsv" else ",", text_col, label_col, split, rows, skipped,
                                   group_col)
    return rows, skipped, encoding


def find_files(data: str | Path) -> list[tuple[Path, str]]:
    """(file, split) pairs: one file is all "train"; a folder gives train.* (required), val.* and test.*."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if root.is_file():
        _format_of(root)
        return [(root, "train")]
    found = [(p, split_name(p.stem)) for p in sorted(root.iterdir())
             if p.is_file() and split_name(p.stem) and p.suffix.lower() in FORMATS]
    splits = [s for _, s in found]
    for s in set(splits):
        if splits.count(s) > 1:
            raise DataError(f"{root}: more than one {s} file: {[str(p) for p, t in found if t == s]}")
    if "train" not in splits:
        raise DataError(f"{root}: no train file; expected train.csv / train.tsv / train.jsonl "
                        "(and optionally val.* and test.*), or pass a single file")
    return found


def read_all(files: list[tuple[Path, str]], text_col: str, label_col: str, group_col: str | None = None):
    """(rows, skipped, encodings, labels_normalised) of every file."""
    rows, skipped, encodings = [], [], {}
    for path, split in files:
        r, s, enc = read_file(path, text_col, label_col, split, group_col)
        rows += r
        skipped += s
        encodings[str(path)] = enc
    labels, changed = normalise_labels([r.label for r in rows])
    for r, y in zip(rows, labels, strict=True):
        r.label = y
    return rows, skipped, encodings, changed


def read_labelled_texts(path: str | Path, cfg: dict) -> list[list[str]]:
    """[[text, label], ...] from a file (every usable row) or a folder (its test file), for `evaluate --data`.

    cfg is the run's config.yaml; its text_col / label_col name the columns.
    """
    root = Path(path)
    if root.is_dir():
        files = [(p, "test") for p in sorted(root.iterdir())
                 if p.is_file() and p.stem.lower() == "test" and p.suffix.lower() in FORMATS]
        if not files:
            raise DataError(f"{root}: no test.csv / test.tsv / test.jsonl to evaluate on; pass the file itself")
    else:
        files = find_files(root)
    rows, skipped, _, _ = read_all(files, cfg.get("text_col", "text"), cfg.get("label_col", "label"))
    if skipped:
        print(f"skipped {len(skipped)} unusable rows of {path}, e.g. {skipped[0]['path']}: {skipped[0]['reason']}",
              file=sys.stderr)
    if not rows:
        raise DataError(f"{path}: no usable labelled texts")
    return [[r.text, r.label] for r in rows]


# --------------------------------------------------------------------------------------------------------------
# checking and splitting


def text_key(text: str) -> str:
    return " ".join(text.casefold().split())  # case and spacing do not make a different text


def _log_groups(rows: list[Row], group_col: str, log) -> None:
    groups = {r.group for r in rows if r.group is not None}
    missing = [r.where for r in rows if r.group is None]
    log(f"groups: {len(groups)} values of '{group_col}'; val/test take whole groups"
        + (f"; {len(missing)} row(s) without a group, each its own (e.g. {missing[0]})" if missing else ""))
    if len(groups) < 10:
        log(f"WARNING: only {len(groups)} groups: val/test hold whole groups, so their scores rest on very few of "
            "them; more groups give a steadier validation score")


# --------------------------------------------------------------------------------------------------------------
# batches


class TokenBatches:
    """Training batches of token ids: seeded order, length buckets, each batch padded to its longest text."""

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 sampler: str, device: torch.device):
        self.ids, self.lengths, self.labels = ids, lengths, labels  # int32 (N, T_max), (N,), int64 (N,), on the CPU
        self.bs, self.seed, self.sampler, self.device = batch_size, seed, sampler, device

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.labels) / self.bs))  # no BatchNorm here: the short last batch is kept

    def plan(self, epoch: int) -> list[torch.Tensor]:
        """The epoch's batches of row indices; a function of (seed, epoch) alone, so a resume repeats it."""
        g = derived_generator(self.seed, epoch)
        order = epoch_order(self.labels, self.sampler, g)
        batches: list[torch.Tensor] = []
        chunk = self.bs * BUCKET
        for c in range(0, len(order), chunk):
            part = order[c:c + chunk]
            part = part[torch.argsort(self.lengths[part], stable=True)]  # similar lengths share a batch
            batches += list(part.split(self.bs))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def epoch(self, epoch: int, start: int = 0):
        for idx in self.plan(epoch)[start:]:
            width = int(self.lengths[idx].max())
            x = self.ids[idx, :width].long()  # (B, T) padded on the right
            yield x.to(self.device, non_blocking=True), self.labels[idx].to(self.device, non_blocking=True)


# --------------------------------------------------------------------------------------------------------------
# the data set


class TextData:
    kind = "text"

    def __init__(self, rows: list[Row], classes: list[str], tokenizer, tokenizer_type: str, cfg: TextTrainConfig,
                 report: dict, encoder: str | None):
        self.rows, self.classes, self.cfg, self.report, self.encoder = rows, classes, cfg, report, encoder
        self.tokenizer_type = tokenizer_type  # bpe | wordpiece | pretrained
        self.class_index = {c: i for i, c in enumerate(classes)}
        self._use_tokenizer(tokenizer)

    # ---- construction ----
    @classmethod
    def load(cls, cfg: TextTrainConfig, log=print) -> TextData:
        from nnforge.models.text import encoder_source

        files = find_files(cfg.data)
        rows, skipped, encodings, renamed = read_all(files, cfg.text_col, cfg.label_col, cfg.group_col)
        if not rows:
            first = f"; first: {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
            raise DataError(f"{cfg.data}: no usable rows ({len(skipped)} skipped{first})")
        labels, where = [r.label for r in rows], [r.where for r in rows]
        classes = check_classes(labels, [r.split for r in rows], where, cfg.data)
        keys = [text_key(r.text) for r in rows]
        if cfg.group_col:  # whole groups go to val/test, and a text repeated in two groups joins them
            keys = joined_keys(keys, [r.group for r in rows])
            _log_groups(rows, cfg.group_col, log)
        for r, split in zip(rows, assign_splits(labels, [r.split for r in rows], keys, cfg.val_split,
                                                 cfg.test_split, cfg.seed), strict=True):
            r.split = split

        encoder = encoder_source(cfg.model, cfg.encoder)
        reused = _tokenizer_beside(cfg.weights) if cfg.weights and encoder is None else None
        if encoder is not None:
            tok, kind = pretrained_tokenizer(encoder), "pretrained"
            log(f"tokenizer: the encoder's own ({encoder}), {tok.get_vocab_size()} ids")
        elif reused is not None:
            tok, kind = load_tokenizer(reused, cfg.max_len), "reused"
            log(f"tokenizer: {reused} (from --weights, so the embeddings line up), {tok.get_vocab_size()} ids")
        else:
            train_texts = [r.text for r in rows if r.split == "train"]
            tok, kind = train_tokenizer(train_texts, cfg.tokenizer, cfg.vocab_size, cfg.lowercase), cfg.tokenizer
            log(f"tokenizer: {cfg.tokenizer} trained on {len(train_texts)} training texts, {tok.get_vocab_size()} ids")
        if cfg.weights and encoder is None and reused is None:
            log(f"WARNING: no {TOKENIZER_FILE} beside {cfg.weights}; a new tokenizer was trained, so the loaded "
                "embeddings do not match its ids")
        report = {"data": str(Path(cfg.data).resolve()), "files": len(files), "encoding": encodings,
                  "fingerprint": fingerprint_files([str(p) for p, _ in files],
                                                   extra=f"{cfg.text_col}\0{cfg.label_col}"
                                                   + (f"\0{cfg.group_col}" if cfg.group_col else "")),
                  "rows": len(rows) + len(skipped), "skipped": skipped, "labels_normalised": renamed}
        data = cls(rows, classes, tok, kind, cfg, report, encoder)
        data._finish_report(log)
        return data

    def _use_tokenizer(self, tok) -> None:
        """Tokenize every row with `tok`; rows that give no tokens at all are skipped (and reported)."""
        self.pad_id = pad_id_of(tok)  # before configure(), which turns a pretrained tokenizer's padding off
        self.tokenizer = configure(tok, self.cfg.max_len)
        encs = self.tokenizer.encode_batch([r.text for r in self.rows])
        keep = [i for i, e in enumerate(encs) if e.ids]
        if len(keep) < len(self.rows):
            self.report["skipped"] += [{"path": self.rows[i].where, "reason": "no tokens after tokenization"}
                                       for i, e in enumerate(encs) if not e.ids]
            self.rows, encs = [self.rows[i] for i in keep], [encs[i] for i in keep]
        self.ids = [np.asarray(e.ids, dtype=np.int64) for e in encs]
        self.truncated = sum(1 for e in encs if e.overflowing)

    def _finish_report(self, log) -> None:
        r, rows = self.report, self.rows
        lengths = np.array([len(i) for i in self.ids])
        r["usable"] = len(rows)
        labels, splits = [x.label for x in rows], [x.split for x in rows]
        r["counts"] = split_counts(labels, splits)
        r["duplicates"] = find_duplicates([text_key(x.text) for x in rows], splits, labels, [x.where for x in rows])
        r["tokenizer"] = {"type": self.tokenizer_type, "vocab_size": self.tokenizer.get_vocab_size(),
                          "max_len": self.cfg.max_len, "truncated": self.truncated,
                          "tokens_mean": round(float(lengths.mean()), 1),
                          "tokens_p95": int(np.percentile(lengths, 95)), "tokens_max": int(lengths.max())}
        _print_report(r, log)

    # ---- what the task needs ----
    @property
    def spec(self) -> dict:
        """Everything predict/serve need to turn a text into the model's input (the tokenizer is in the run)."""
        return {"kind": "text", "tokenizer": TOKENIZER_FILE, "tokenizer_type": self.tokenizer_type,
                "vocab_size": self.tokenizer.get_vocab_size(), "max_len": self.cfg.max_len, "pad_id": self.pad_id,
                "lowercase": self.cfg.lowercase if self.encoder is None else None}

    def train_inputs(self) -> list[np.ndarray]:
        """The training texts as the model reads them (token ids), for models that learn statistics of them."""
        return [self.ids[i] for i in self._index("train")]

    def blind(self, x: torch.Tensor) -> torch.Tensor:
        """One input for every example (the doctor's baseline): a single fixed token, then padding; all-padding
        would be no text at all, and a kept length would still inform."""
        unk = self.tokenizer.token_to_id("[UNK]")
        token = unk if unk is not None and unk != self.pad_id else self.pad_id + 1
        out = torch.full_like(x, self.pad_id)
        out[:, 0] = token
        return out

    def model_kwargs(self) -> dict:
        kw = {"vocab_size": self.tokenizer.get_vocab_size(), "pad_id": self.pad_id, "max_len": self.cfg.max_len}
        if self.encoder is not None:  # the architecture travels with the run: rebuilding it needs no download
            from nnforge.models.text import encoder_config

            kw.update(encoder=self.cfg.encoder, encoder_config=encoder_config(self.encoder),
                      freeze_encoder=self.cfg.freeze_encoder)
        return kw

    def _index(self, split: str) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.split == split]

    def items(self, split: str) -> list[str]:
        return [self.rows[i].text for i in self._index(split)]

    def labels(self, split: str) -> torch.Tensor:
        return torch.tensor([self.class_index[self.rows[i].label] for i in self._index(split)], dtype=torch.long)

    def split_record(self) -> dict:
        return {sp: [[self.rows[i].text, self.rows[i].label] for i in self._index(sp)]
                for sp in ("train", "val", "test")}

    def train_source(self, device: torch.device) -> TokenBatches:
        idx = self._index("train")
        seqs = [self.ids[i] for i in idx]
        ids = torch.from_numpy(pad_batch(seqs, self.pad_id).astype(np.int32))  # int32 halves the memory
        lengths = torch.tensor([len(s) for s in seqs])
        return TokenBatches(ids, lengths, self.labels("train"), self.cfg.batch_size, self.cfg.seed,
                            self.cfg.sampler, device)

    def eval_batches(self, split: str, device: torch.device, batch_size: int = 512):
        """(ids, labels) batches of a split in file order, each padded to its longest text."""
        idx, labels = self._index(split), self.labels(split)
        for s in range(0, len(idx), batch_size):
            x = torch.from_numpy(pad_batch([self.ids[i] for i in idx[s:s + batch_size]], self.pad_id))
            yield x.to(device), labels[s:s + batch_size].to(device)

    def save_artifacts(self, run_path: str | Path) -> None:
        """Write the tokenizer into the run. A resumed run keeps the tokenizer its checkpoints were trained with."""
        path = Path(run_path) / TOKENIZER_FILE
        if path.is_file():
            existing = load_tokenizer(path, self.cfg.max_len)
            if existing.to_str() != self.tokenizer.to_str():
                self._use_tokenizer(existing)
            return
        self.tokenizer.save(str(path))


def _tokenizer_beside(weights: str) -> Path | None:
    """The tokenizer.json of the run that --weights points into (a run folder or a file in its checkpoints/)."""
    p = Path(weights)
    for folder in (p, p.parent, p.parent.parent):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    return None


def _print_report(r: dict, log) -> None:
    c, t = r["counts"], r["tokenizer"]
    log(f"data: {r['usable']} usable of {r['rows']} rows in {r['files']} file(s) "
        f"({', '.join(sorted(set(r['encoding'].values())))}), {len(c['train'])} classes; "
        f"train {sum(c['train'].values())} / val {sum(c['val'].values())} / test {sum(c['test'].values())}; "
        f"tokens per text: mean {t['tokens_mean']}, p95 {t['tokens_p95']}, max {t['tokens_max']}")
    if t["truncated"]:
        log(f"note: {t['truncated']} texts are longer than max_len {t['max_len']} tokens and were cut")
    log_problems(r, log, "rows", "texts")
    sys.stdout.flush()
