"""Property-based tests (Hypothesis): for any generated input, nnforge's readers give a result, a reported-and-skipped
row or file, or a one-line error naming the file; never a traceback, never a row lost without being counted.

A fixed seed and a small example count keep CI fast and repeatable; NNFORGE_FUZZ_EXAMPLES=2000 runs longer.

    .venv/bin/pytest tests/test_fuzz.py -q
    NNFORGE_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from nnforge.data.imageio import ImageError, check_image, decode_image
from nnforge.data.inputs import InputError, TensorInput, build_input
from nnforge.data.rules import DataError
from nnforge.data.text import read_file

EXAMPLES = int(os.environ.get("NNFORGE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Texts with what breaks readers: delimiters, quotes, line breaks, non-ASCII, NUL, lone surrogates excluded
# (they cannot be written as UTF-8 at all).
TEXT = st.text(alphabet=st.sampled_from(list('abc xyz,\t"\'\n\r;|é漢字\x00\\')), max_size=30)
LABELS = st.sampled_from(["pos", "neg", "1", "1.0", " 2 ", "x,y", 'q"uote', ""])


def _write(rows: list[tuple[str, str]], delimiter: str) -> str:
    out = io.StringIO(newline="")
    w = csv.writer(out, delimiter=delimiter)
    w.writerow(["text", "label"])
    w.writerows(rows)
    return out.getvalue()


def _read(content: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        try:
            rows, skipped, _ = read_file(path, "text", "label")
        except DataError as err:
            msg = str(err)
            assert str(path) in msg and "\n" not in msg.split(": ", 1)[0], msg  # names the file, one line
            return None
        return rows, skipped


@FUZZ
@seed(0)
@given(st.lists(st.tuples(TEXT, LABELS), min_size=1, max_size=25), st.sampled_from([",", "\t"]))
def test_a_well_formed_table_loses_no_row(rows, delimiter):
    """Written by a CSV writer, every row is read or skipped with a reason, and a read row is what was written."""
    suffix = ".csv" if delimiter == "," else ".tsv"
    got = _read(_write(rows, delimiter).encode("utf-8"), suffix)
    if got is None:  # refused as a whole: allowed, with the file named
        return
    read, skipped = got
    assert len(read) + len(skipped) == len(rows), (rows, read, skipped)
    written = {(t.strip(), y.strip()) for t, y in rows}
    for r in read:
        assert (r.text, r.label) in written, (r, rows)
        assert r.text and "\x00" not in r.text
    for s in skipped:
        assert s["path"].rsplit(":", 1)[1].isdigit() and s["reason"]


@FUZZ
@seed(1)
@given(st.lists(st.tuples(st.text(alphabet="abcde fgh", min_size=1, max_size=12), st.sampled_from(["pos", "neg"])),
                min_size=3, max_size=30), st.data())
def test_a_stray_quote_never_swallows_rows_silently(rows, data):
    """One quote inserted anywhere: the file is refused (naming the line), or every row is still accounted for."""
    content = _write(rows, ",")
    lines = content.split("\r\n")
    i = data.draw(st.integers(1, len(rows)))  # a data line
    j = data.draw(st.integers(0, len(lines[i])))
    lines[i] = lines[i][:j] + '"' + lines[i][j:]
    got = _read("\r\n".join(lines).encode(), ".csv")
    if got is not None:
        read, skipped = got
        assert len(read) + len(skipped) == len(rows), (lines, read, skipped)


@FUZZ
@seed(2)
@given(st.lists(st.fixed_dictionaries({"text": st.one_of(TEXT, st.integers(), st.none()),
                                       "label": st.one_of(LABELS, st.floats(allow_nan=True), st.booleans(),
                                                          st.none(), st.lists(st.integers(), max_size=2))}),
                max_size=20), st.booleans())
def test_json_lines_of_any_values_are_read_or_skipped(objs, garbage):
    lines = [json.dumps(o) for o in objs] + (["{not json", "[1, 2]", "42"] if garbage else [])
    got = _read(("\n".join(lines) + "\n").encode(), ".jsonl")
    if got is not None:
        read, skipped = got
        assert len(read) + len(skipped) == len(lines)


@FUZZ
@seed(3)
@given(st.binary(max_size=400))
def test_any_bytes_as_a_table_or_an_image_give_a_result_or_a_named_error(raw):
    _read(raw, ".csv")  # asserts inside
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.png"
        p.write_bytes(raw)
        check = check_image(p)  # never raises: a usable image or a reason
        assert check.ok or check.reason
    try:
        decode_image(raw, 1, 8)
    except ImageError as err:
        assert str(err) and "\n" not in str(err)


def _png(w: int, h: int, mode: str, rng: np.random.Generator) -> bytes:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(out, "PNG")
    return out.getvalue()


@FUZZ
@seed(4)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from(["L", "RGB", "RGBA"]), st.integers(0, 2**32 - 1),
       st.integers(0, 200), st.sampled_from(["keep", "truncate", "flip"]))
def test_images_decode_to_the_model_size_or_fail_with_a_reason(w, h, mode, rng_seed, cut, damage):
    rng = np.random.default_rng(rng_seed)
    raw = _png(w, h, mode, rng)
    if damage == "truncate":
        raw = raw[:max(8, len(raw) - cut)]
    elif damage == "flip" and len(raw) > 60:
        b = bytearray(raw)
        b[50 + cut % (len(raw) - 50)] ^= 0xFF
        raw = bytes(b)
    for channels in (1, 3):
        try:
            arr = decode_image(raw, channels, 16)
        except ImageError as err:
            assert damage != "keep", err  # an intact image always decodes
            continue
        assert arr.shape == (channels, 16, 16) and arr.dtype == np.uint8


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=4), max_leaves=12)


@FUZZ
@seed(5)
@given(JSON_VALUES)
def test_request_bodies_of_any_json_give_inputs_or_an_input_error(body):
    """What the server does with a JSON body, for the image and tensor input kinds: inputs, or InputError (4xx)."""
    kinds = [build_input({"kind": "image", "channels": 1, "size": 8, "mean": [0.5], "std": [0.5]}),
             TensorInput({"kind": "tensor", "shape": [3]})]
    for pre in kinds:
        try:
            items = pre.read_json(body, max_inputs=8)
            for _, raw in items:
                pre.decode(raw)
        except InputError as err:
            assert str(err) and "\n" not in str(err)
