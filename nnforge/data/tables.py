"""Reading CSV/TSV files: one reader for every table nnforge takes (texts and labels, image paths and labels).

    table = read_table(Path("reviews.csv"), ",", {"text": "--text-col", "label": "--label-col"})
    for line, fields in table.rows: ...          # line: where the record starts (1-based), fields by column index
    table.skipped                                # [{"path": "reviews.csv:7", "reason": "expected 2 fields, got 3"}]

Encodings: UTF-8 (with or without a BOM), UTF-16 with or without a BOM, else Latin-1 (Windows-1252 when its curly
quotes and dashes appear). A record that cannot be used is skipped with its line and the reason; what cannot be
read at all is a DataError naming the file and line: a missing or repeated column, and an unterminated quote,
which would otherwise swallow every following line into one field without a word.
"""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from nnforge.data.rules import DataError

# An unterminated quote: a record spanning several physical lines, one of which reads as a row of its own (the file's
# column count and, where labels are known, a label seen elsewhere in the label column), is refused. A text that
# really spans lines rarely has a line ending in a delimiter and a known label; a swallowed row always does.
SWALLOW_MIN_LINES, SWALLOWED_ROWS = 2, 1


def detect_encoding(raw: bytes) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    sample = raw[:4096]
    if len(sample) >= 4:  # UTF-16 without a BOM: ASCII text has a NUL in every other byte
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
            return "utf-16-le"
        if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
            return "utf-16-be"
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    # Not UTF-8: a legacy 8-bit file. Windows-1252 is Latin-1 with printable punctuation (curly quotes, dashes)
    # where Latin-1 has invisible control codes, so prefer it when it fits.
    try:
        raw.decode("cp1252")
        return "cp1252" if any(0x80 <= b <= 0x9F for b in raw) else "latin-1"
    except UnicodeDecodeError:
        return "latin-1"


def read_text_file(path: Path) -> tuple[str, str]:
    """(content, encoding) of a text file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror})") from None
    encoding = detect_encoding(raw)
    try:
        return raw.decode(encoding), encoding
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid {encoding} (byte {err.start})") from None


@dataclass
class Table:
    path: Path
    encoding: str
    header: list[str]
    columns: dict[str, int]  # the required columns -> their index
    rows: list[tuple[int, list[str]]] = field(default_factory=list)  # (line where the record starts, fields)
    skipped: list[dict] = field(default_factory=list)


def _header(path: Path, header: list[str], required: dict[str, str]) -> dict[str, int]:
    columns = {}
    for col, flag in required.items():
        at = [i for i, h in enumerate(header) if h == col]
        if not at:
            raise DataError(f"{path}: no column '{col}'; the header has {header} (set {flag})")
        if len(at) > 1:
            raise DataError(f"{path}: column '{col}' appears {len(at)} times in the header (columns "
                            f"{', '.join(str(i + 1) for i in at)}); rename the others so it is clear which to read")
        columns[col] = at[0]
    return columns


def _swallowed(table: Table, line: int, fields: list[str], span: int, delimiter: str, label_idx: int | None,
               labels: set[str]) -> int:
    """How many of a multi-line record's lines look like rows of their own (the sign of an unterminated quote)."""
    width = len(table.header)
    count = 0
    for text in "\n".join(fields).split("\n")[1:]:
        try:
            parts = next(csv.reader([text], delimiter=delimiter), [])
        except csv.Error:
            continue
        if len(parts) == width and (label_idx is None or not labels or parts[label_idx].strip() in labels):
            count += 1
    return count


def read_table(path: Path, delimiter: str, required: dict[str, str], label: str | None = None,
               names: list[str] | None = None, quoting: bool = True) -> Table:
    """Read a delimited file; `required` maps the columns read to the flag that names them; `label` is the label
    column, whose values help recognise rows swallowed by an unterminated quote. `names`: the columns of a file
    without a header row (MovieLens' u.data); quoting=False for formats where a quote is an ordinary character
    (MovieLens, RecBole's atomic files)."""
    content, encoding = read_text_file(path)
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
    try:
        header = list(names) if names is not None else [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected a header row naming the columns") from None
    except csv.Error as err:
        raise DataError(f"{path}:1: unreadable header row ({err})") from None
    table = Table(path, encoding, header, _header(path, header, required))
    width, sep = len(header), {"\t": "tab", ",": "comma"}.get(delimiter, repr(delimiter))
    spans: list[tuple[int, int, list[str]]] = []  # multi-line records: (line, lines spanned, fields)
    line = reader.line_num
    while True:
        start = line + 1  # a quoted field may span lines: a record starts after the previous one
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            table.skipped.append({"path": f"{path}:{start}", "reason": f"malformed row ({err})"})
            line = reader.line_num
            continue
        line = reader.line_num
        if line - start + 1 >= SWALLOW_MIN_LINES:
            spans.append((start, line - start + 1, rec))
        if not rec:
            continue  # a blank line
        if len(rec) != width:
            hint = f" (a {sep} inside a text needs quotes)" if len(rec) > width else ""
            table.skipped.append({"path": f"{path}:{start}",
                                  "reason": f"expected {width} fields, got {len(rec)}{hint}"})
            continue
        table.rows.append((start, rec))
    label_idx = table.columns.get(label) if label else None
    labels = {rec[label_idx].strip() for _, rec in table.rows if label_idx is not None and "\n" not in rec[label_idx]}
    for start, span, rec in spans:
        # A record over several lines is a quoted text with line breaks, or a quote never closed. Never closed when:
        # its fields do not fit the header, its label spans lines, or one of its lines reads as a row of its own.
        broken = (len(rec) != width or (label_idx is not None and "\n" in rec[label_idx])
                  or _swallowed(table, start, rec, span, delimiter, label_idx, labels) >= SWALLOWED_ROWS)
        if broken:
            raise DataError(
                f"{path}:{start}: a quote opened in this record is never closed, so the next {span - 1} lines "
                f"(to line {start + span - 1}) were read as one field. Close the quote, write a quote inside a "
                f'quoted field as two (""), or remove the stray quote')
    return table
