"""The rules every labelled data set follows, whatever its inputs: one implementation, images and texts both call it.

    split = split_name("dev")                                   # -> "val" (train / val / test, and their aliases)
    classes = check_classes(labels, splits, where, "data/")     # DataError on a class that cannot be learned
    keys = joined_keys(text_keys, groups)                       # --group-col: a group and its texts stay together
    splits = assign_splits(labels, splits, keys, 0.1, 0.1, seed=0)
    dups = find_duplicates(keys, splits, labels, where)         # identical content; "leak" across splits

An item is described by parallel lists: its label, its split, a content key (a file's sha256, a text up to case and
spacing) and where it came from (a path, "file.csv:12"), which every message names.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from nnforge.data.splits import stratified_split

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
# A class needs two training examples: one is seen once, and the stratified split can give none to val or test.
MIN_TRAIN_PER_CLASS = 2


class DataError(ValueError):
    """The data set cannot be used as given; the message names the file, row or folder."""


def split_name(name: str) -> str | None:
    """train / val / test for a folder name, file stem or split column value (dev, valid, validation = val)."""
    return SPLIT_NAMES.get(name.strip().lower())


def check_classes(labels: list[str], splits: list[str], where: list[str], data: str, min_classes: int = 2) -> list[str]:
    """The sorted class names, or a DataError: fewer than `min_classes` classes (2 for a classifier; 1 where labels
    are optional, a GAN's), a class missing from train, or a class with fewer than MIN_TRAIN_PER_CLASS training
    examples (named with where one of its examples is)."""
    train = Counter(y for y, s in zip(labels, splits, strict=True) if s == "train")
    classes = sorted(train)
    first = {}
    for y, w in zip(labels, where, strict=True):
        first.setdefault(y, w)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataError(f"{data}: labels {unknown} appear in val/test (e.g. {first[unknown[0]]}) but not in train")
    if len(classes) < min_classes:
        raise DataError(f"{data}: found only the label(s) {classes}; at least {min_classes} classes are needed "
                        "(one folder or label per class)")
    few = [c for c in classes if train[c] < MIN_TRAIN_PER_CLASS]
    if few:
        shown = ", ".join(f"'{c}' ({train[c]}, e.g. {first[c]})" for c in few[:5])
        raise DataError(f"{data}: every class needs at least {MIN_TRAIN_PER_CLASS} usable training examples; "
                        f"too few for {shown}{f' and {len(few) - 5} more' if len(few) > 5 else ''}. Add "
                        "examples, fix the label if it is a typo, or remove them")
    return classes


def assign_splits(labels: list[str], splits: list[str], keys: list[str], val_split: float, test_split: float,
                  seed: int) -> list[str]:
    """Each item's split: val and test are carved out of train (stratified, seeded) where the data gave none.

    Items with the same content key are kept together, so a duplicate cannot leak from train into val or test.
    """
    present = set(splits)
    fractions = {k: f for k, f in (("val", val_split), ("test", test_split)) if k not in present and f > 0}
    out = list(splits)
    if not fractions:
        return out
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (s, key) in enumerate(zip(splits, keys, strict=True)):
        if s == "train":
            groups[key].append(i)
    firsts = list(groups)
    parts = stratified_split([labels[groups[k][0]] for k in firsts], fractions, seed)
    for split, idx in parts.items():
        for j in idx:
            for i in groups[firsts[j]]:
                out[i] = split
    return out


def joined_keys(*key_lists: list[str | None]) -> list[str]:
    """One key per item such that items sharing any key of any list get the same one (their connected component):
    joined_keys(texts, groups) keeps a group together, and with it every copy of its texts wherever they appear.
    A None key joins nothing."""
    parent = list(range(len(key_lists[0])))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for keys in key_lists:
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key is not None:
                parent[root(i)] = root(first.setdefault(key, i))
    return [str(root(i)) for i in range(len(parent))]


def find_duplicates(keys: list[str], splits: list[str], labels: list[str], where: list[str]) -> list[dict]:
    """Groups of items with identical content: where they are, their splits and labels, and whether they leak
    (appear in more than one split)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    out = []
    for idx in groups.values():
        if len(idx) > 1:
            in_splits = sorted({splits[i] for i in idx})
            out.append({"paths": [where[i] for i in idx], "splits": in_splits,
                        "labels": sorted({labels[i] for i in idx}), "leak": len(in_splits) > 1})
    return out


def split_counts(labels: list[str], splits: list[str]) -> dict[str, dict[str, int]]:
    """{split: {class: count}} for the data report."""
    return {sp: dict(sorted(Counter(y for y, s in zip(labels, splits, strict=True) if s == sp).items()))
            for sp in SPLITS}


def epoch_order(labels, sampler: str, g):
    """One epoch's order of example indices: a permutation, or for "balanced" every class equally likely (drawn
    with replacement, so rare examples repeat). `labels` is a (N,) int64 tensor, `g` a torch.Generator."""
    import torch

    n = len(labels)
    if sampler == "balanced":
        counts = torch.bincount(labels.cpu())
        weights = (1.0 / counts.float())[labels.cpu()]
        return torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def log_problems(r: dict, log, unit: str, noun: str) -> None:
    """The parts of a data report a person must see: skipped items, cross-split duplicates, class imbalance."""
    if r["skipped"]:
        log(f"skipped {len(r['skipped'])} unusable {unit} (listed in data_report.json):")
        for s in r["skipped"][:10]:
            log(f"  {s['path']}: {s['reason']}")
        if len(r["skipped"]) > 10:
            log(f"  ... and {len(r['skipped']) - 10} more")
    outside = r.get("outside_links") or []
    if outside:
        log(f"note: {len(outside)} symbolic links lead out of the data folder and were followed, e.g. "
            f"{outside[0]['path']} -> {outside[0]['target']}")
    leaks = [d for d in r["duplicates"] if d["leak"]]
    if leaks:
        log(f"WARNING: {len(leaks)} {noun} appear in more than one split (identical content: leakage), e.g.")
        for d in leaks[:5]:
            log(f"  {' == '.join(d['paths'][:3])}")
    if r.get("labels_normalised"):
        shown = ", ".join(f"{k} ({n} rows)" for k, n in list(r["labels_normalised"].items())[:5])
        log(f"note: labels written as numbers were read as one class each: {shown}")
    clash = [d for d in r["duplicates"] if len(d.get("labels", [])) > 1]
    if clash:
        log(f"WARNING: {len(clash)} {noun} appear with different labels, e.g. {' / '.join(clash[0]['paths'][:3])}")
    counts = list(r["counts"]["train"].values())
    if counts and max(counts) > 3 * min(counts):
        log(f"note: classes are imbalanced ({min(counts)} to {max(counts)} training {noun}); consider "
            "--class-weights auto or --sampler balanced")


def class_weights_for(labels, num_classes: int):
    """Inverse-frequency loss weights (a torch tensor), scaled so a balanced data set gets all ones."""
    import torch

    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    return counts.sum() / (num_classes * counts)


def normalise_label(value) -> str:
    """A label as text: trimmed, and an integer however it is written (1, "1", " 1 ", 1.0, "1.00", "+1") as "1",
    so a label column that a spreadsheet or JSON wrote as floats does not split one class in two."""
    text = str(value).strip()
    if isinstance(value, bool):
        return text
    number = text.split(".", 1)
    if number[0].lstrip("+-").isdigit() and (len(number) == 1 or set(number[1]) <= {"0"}):
        return str(int(number[0]))
    return text


def normalise_labels(labels: list[str]) -> tuple[list[str], dict[str, int]]:
    """(normalised labels, {"'1.0' -> '1'": rows} for every spelling that changed), for the data report."""
    out, changed = [], Counter()
    for y in labels:
        n = normalise_label(y)
        if n != y:
            changed[f"'{y}' -> '{n}'"] += 1
        out.append(n)
    return out, dict(changed)
