"""Metadata tables (CSV, TSV or Parquet): read them, join several on the image column, and type each column.

Cells are read as text so that typing is explicit: empty cells and NA codes become null, never ""; a column is
bool, int64, float64, ClassLabel (text with few distinct values) or string (ids, free text, codes with leading
zeros).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Value

from derm_accel.data.presets import guess_preset
from derm_accel.data.scan import ScanError

NULL_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none"})
CLASSLABEL_MAX = 100  # text columns with at most this many values (each seen twice on average) -> ClassLabel
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INFINITE = re.compile(r"[+-]?inf(inity)?", re.IGNORECASE)  # a number that is no measurement: missing data


# ---- reading ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str | None:
    """A table cell as stripped text; empty cells and NA codes become None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = str(value).strip()
    return None if text.lower() in NULL_TOKENS else text


def _delimiter(path: Path, sample: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def read_table(path: Path) -> tuple[list[str], list[dict[str, str | None]], list[int]]:
    """Header, rows (cells as text or None) and each row's line number in the file (1 = header)."""
    if not path.is_file():
        raise ScanError(f"Metadata file {path} does not exist; pass a CSV, TSV or Parquet file with --metadata.")
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        header = list(table.column_names)
        rows = [{k: _cell(v) for k, v in r.items()} for r in table.to_pylist()]
        return header, rows, list(range(1, len(rows) + 1))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScanError(f"Metadata file {path} is not UTF-8 text ({exc}); save it as UTF-8 CSV.") from exc
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text[:4096]))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ScanError(f"Metadata file {path} is empty; it needs a header row and one row per image.") from None
    rows, lines = [], []
    for values in reader:
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) != len(header):
            raise ScanError(
                f"{path}, line {reader.line_num}: {len(values)} cells for {len(header)} header columns; "
                "fix the quoting or the delimiter of that line."
            )
        rows.append({h: _cell(v) for h, v in zip(header, values, strict=True)})
        lines.append(reader.line_num)
    return header, rows, lines


def _usable_columns(header: list[str], path: Path) -> tuple[list[str], list[str]]:
    """Named columns, and the unnamed ones (an index written by pandas) that are left out."""
    seen = Counter(header)
    twice = sorted(h for h, n in seen.items() if n > 1 and h)
    if twice:
        raise ScanError(f"Metadata file {path} has repeated column names {twice}; rename them.")
    unnamed = [h for h in header if not h or re.fullmatch(r"Unnamed: \d+", h)]
    return [h for h in header if h not in unnamed], unnamed


@dataclass
class Table:
    """The merged rows of every metadata file, keyed by the image column."""

    columns: list[str]
    rows: list[dict[str, str | None]]
    where: list[str]  # "file:line" of each row
    skipped: list[dict[str, Any]]
    unnamed_columns: list[str]
    # (row, its skip entry in ``skipped``, that row's cells) of each row naming an image again in one file: the
    # caller compares their labels with the kept row's (a different label is a conflict, not a duplicate)
    repeats: list[tuple[int, dict[str, Any], dict[str, str | None]]] = field(default_factory=list)


def load_tables(
    files: Sequence[Path], image_column: str, na_values: Mapping[str, Sequence[str]] | None = None
) -> Table:
    """Read every file; rows of later files join the first row naming the same image (outer join);
    ``na_values`` holds extra per-column missing-value codes (Fitzpatrick17k's -1)."""
    columns: list[str] = []
    rows: list[dict[str, str | None]] = []
    where: list[str] = []
    skipped: list[dict[str, Any]] = []
    unnamed_all: list[str] = []
    by_image: dict[str, int] = {}
    repeats: list[tuple[int, dict[str, Any], dict[str, str | None]]] = []
    for path in files:
        header, file_rows, lines = read_table(path)
        usable, unnamed = _usable_columns(header, path)
        unnamed_all += [f"{path.name}:{h or '(empty)'}" for h in unnamed]
        if image_column not in usable:
            guess = guess_preset(usable)
            raise ScanError(
                f"Metadata file {path} has no image column {image_column!r}; its columns are {usable}. "
                "Pass --image-column NAME" + (f", or --preset {guess} (its columns match)." if guess else ".")
            )
        clash = sorted((set(usable) & set(columns)) - {image_column})
        if clash:
            raise ScanError(f"Column(s) {clash} of {path} also appear in an earlier metadata file; keep one.")
        columns += [c for c in usable if c != image_column or not columns]
        in_this_file: dict[str, str] = {}
        for row, line in zip(file_rows, lines, strict=True):
            ref = f"{path.name}:{line}"
            image = row.get(image_column)
            if image is None:
                skipped.append({"row": ref, "image": None, "reason": "missing_image_name", "detail": ""})
                continue
            if image in in_this_file:
                detail = f"same image as {in_this_file[image]}"
                skip = {"row": ref, "image": image, "reason": "duplicate_row", "detail": detail}
                skipped.append(skip)
                repeats.append((by_image[image], skip, {c: row[c] for c in usable}))
                continue
            in_this_file[image] = ref
            cells = {c: row[c] for c in usable}
            if image in by_image:  # the same image in an earlier file: join its columns
                rows[by_image[image]].update(cells)
                continue
            by_image[image] = len(rows)
            rows.append(cells)
            where.append(ref)
    for row in rows:
        for c in columns:
            row.setdefault(c, None)
    for column, codes in (na_values or {}).items():
        for row in [*rows, *(cells for _, _, cells in repeats)]:
            if row.get(column) in codes:
                row[column] = None
    return Table(columns, rows, where, skipped, unnamed_all, repeats)


# ---- typing ----------------------------------------------------------------------------------------------


def infer_feature(values: Sequence[str | None], categorical: bool = True) -> tuple[Any, list[Any], str]:
    """The datasets feature of a column, its encoded values (None stays None) and a short type name.

    Text columns with few distinct values become a ClassLabel when ``categorical`` (not for ids)."""
    present = [v for v in values if v is not None]
    if not present:
        return Value("string"), list(values), "string (all empty)"
    lowered = {v.lower() for v in present}
    if lowered <= {"true", "false"}:
        return Value("bool"), [None if v is None else v.lower() == "true" for v in values], "bool"
    finite = [v for v in present if not _INFINITE.fullmatch(v)]
    if not finite:
        return Value("float64"), [None] * len(values), f"float ({len(present)} infinite values read as missing)"
    if finite and not any(re.match(r"[+-]?0\d", v) for v in finite):  # codes with leading zeros stay text
        # "inf" in a numeric column is missing data, as NaN is (never a value of its own, never text)
        numbers = [None if v is None or _INFINITE.fullmatch(v) else v for v in values]
        note = f" ({len(present) - len(finite)} infinite values read as missing)" if len(finite) < len(present) else ""
        if all(_INT.fullmatch(v) for v in finite):
            ints = [None if v is None else int(v) for v in numbers]
            if all(-(2**63) <= i < 2**63 for i in ints if i is not None):
                return Value("int64"), ints, "int" + note
        if all(_FLOAT.fullmatch(v) for v in finite):
            return Value("float64"), [None if v is None else float(v) for v in numbers], "float" + note
    distinct = sorted(set(present))
    if categorical and len(distinct) <= min(CLASSLABEL_MAX, max(2, len(present) // 2)):
        return ClassLabel(names=distinct), list(values), "ClassLabel"
    return Value("string"), list(values), "string"
