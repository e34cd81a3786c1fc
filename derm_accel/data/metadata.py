"""Images plus a metadata table (CSV, TSV or Parquet), the way HAM10000, ISIC, PAD-UFES-20, Fitzpatrick17k and
DDI ship: one row per image with its label, patient or lesion id, age, sex, body site, skin type...

This module reads the table (``tables``), matches rows to the files found under SRC and returns a
:class:`MetadataScan` that ``convert`` consumes like a class-folder scan. It accounts for every file (a row or a
skip with its reason) and every table row (matched to a file, or skipped with its reason). Group columns
(patient, lesion) later join the duplicate groups, so all images of one patient land in one split.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Features

from derm_accel.core.escape import md_code
from derm_accel.data.dedupe import UnionFind
from derm_accel.data.presets import Preset, get_preset, guess_preset
from derm_accel.data.scan import ScanError, ScanResult, Skip, SourceFile, is_hidden, leaves_tree, walk_files
from derm_accel.data.schema import dataset_features
from derm_accel.data.tables import Table, infer_feature, load_tables

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
UNKNOWN_LABELS = frozenset({"unknown", "unk"})
NO_GROUPS = "none"
_RESERVED = frozenset(dataset_features([]).keys()) | {"labels", "pixel_values", "index"}

ROW_REASONS = {
    "image_not_found": "no file under SRC has this name (with or without extension)",
    "ambiguous_image": "several files under SRC match this name",
    "duplicate_row": "another row already names the same image, with the same label",
    "conflict": "another row names the same image with a different label: the image is left out",
    "missing_image_name": "the image column is empty",
}
FILE_REASONS = {
    "no_metadata_row": "no row of the metadata table names this file",
    "metadata_file": "the metadata table itself",
    "ambiguous_match": "a row's name matches several files, so none of them is used",
    "missing_label": "its row has an empty label",
    "unknown_label": "its row's label is 'unknown' (or 'UNK')",
    "ambiguous_label": "its row has several one-hot label columns set",
    "duplicate_file": "a byte-identical copy of the file its row names (e.g. Kaggle's doubled HAM10000 folders)",
}


@dataclass(frozen=True)
class MetadataSpec:
    """Which table(s) and which columns: explicit options win over the preset."""

    files: tuple[Path, ...]
    image_column: str
    label_column: str | None = None
    label_columns: tuple[str, ...] = ()
    group_columns: tuple[str, ...] = ()
    na_values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    preset: str | None = None
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": [p.name for p in self.files],
            "preset": self.preset,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "label_columns": list(self.label_columns),
            "group_columns": list(self.group_columns),
            "na_values": {k: list(v) for k, v in self.na_values.items()},
        }


def metadata_spec(
    files: str | Path | Sequence[str | Path],
    *,
    preset: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    group_columns: Sequence[str] | None = None,
) -> MetadataSpec:
    """Build the spec from the CLI options. ``label_column`` "A,B,C" means one-hot columns A, B and C;
    ``group_columns=["none"]`` turns a preset's grouping off."""
    paths = (files,) if isinstance(files, (str, Path)) else tuple(files)
    if not paths:
        raise ScanError("--metadata needs at least one CSV, TSV or Parquet file.")
    chosen: Preset | None = get_preset(preset)
    label_columns: tuple[str, ...] = ()
    if label_column and "," in label_column:
        label_columns = tuple(c.strip() for c in label_column.split(",") if c.strip())
        label_column = None
    elif not label_column and chosen is not None:
        label_column, label_columns = chosen.label_column, chosen.label_columns
    groups = tuple(group_columns) if group_columns else (chosen.group_columns if chosen else ())
    if [g.lower() for g in groups] == [NO_GROUPS]:
        groups = ()
    image = image_column or (chosen.image_column if chosen else None)
    if not image or not (label_column or label_columns):
        missing = " and ".join(
            n for n, v in (("--image-column", image), ("--label-column", label_column or label_columns)) if not v
        )
        raise ScanError(f"Metadata conversion needs {missing} (or --preset NAME).")
    return MetadataSpec(
        files=tuple(Path(p).expanduser().resolve() for p in paths),
        image_column=image,
        label_column=label_column,
        label_columns=label_columns,
        group_columns=groups,
        na_values=dict(chosen.na_values) if chosen else {},
        preset=preset,
        hint=chosen.hint if chosen else "",
    )


# ---- matching --------------------------------------------------------------------------------------------


@dataclass
class FileIndex:
    rels: list[str]
    by_name: dict[str, list[int]]
    by_stem: dict[str, list[int]]

    def __post_init__(self) -> None:
        self.by_rel = {rel: i for i, rel in enumerate(self.rels)}

    def candidates(self, value: str) -> list[int]:
        value = value.replace("\\", "/").removeprefix("./")
        if "/" in value:
            if value in self.by_rel:
                return [self.by_rel[value]]
            return [i for i, rel in enumerate(self.rels) if rel.endswith("/" + value)]
        return self.by_name.get(value) or self.by_stem.get(value, [])


def index_files(
    src: Path, tables: Sequence[Path], follow_external_links: bool = False
) -> tuple[FileIndex, list[str], list[Skip]]:
    """Every file under SRC: visible ones indexed by name and (image files) by stem; the rest as skips."""
    table_paths = {p.resolve() for p in tables}
    root_real = os.path.realpath(src)
    rels, paths, skipped = [], [], []
    by_name: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for path in walk_files(src):
        rel_path = path.relative_to(src)
        rel = rel_path.as_posix()
        if is_hidden(rel_path.parts):
            skipped.append(Skip(rel, "hidden", "file or folder name starts with '.'"))
            continue
        if not follow_external_links and leaves_tree(path, root_real):
            skipped.append(
                Skip(rel, "external_link", "a link leads outside SRC; pass --follow-external-links to include it")
            )
            continue
        if path.resolve() in table_paths:
            skipped.append(Skip(rel, "metadata_file", "the metadata table itself"))
            continue
        i = len(rels)
        rels.append(rel)
        paths.append(str(path))
        by_name.setdefault(path.name, []).append(i)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(path.stem, []).append(i)
    return FileIndex(rels, by_name, by_stem), paths, skipped


def _identical(paths: Sequence[str]) -> bool:
    """True when every file has the same bytes (sizes first, then sha256)."""
    if len({os.path.getsize(p) for p in paths}) > 1:
        return False
    digests = set()
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:  # chunked: hashlib.file_digest needs Python 3.11
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digests.add(digest.hexdigest())
    return len(digests) == 1


# ---- labels ----------------------------------------------------------------------------------------------


def _raw_label(row: Mapping[str, str | None], spec: MetadataSpec) -> tuple[str | None, str]:
    """The label text of a row, or (None, reason)."""
    if spec.label_column:
        value = row.get(spec.label_column)
        return (value, "") if value is not None else (None, "missing_label")
    hot = []
    for column in spec.label_columns:
        value = row.get(column)
        try:
            if value is not None and float(value) > 0.5:
                hot.append(column)
        except ValueError:
            return None, "missing_label"
    if len(hot) > 1:
        return None, "ambiguous_label"
    return (hot[0], "") if hot else (None, "missing_label")


def _check_label_columns(spec: MetadataSpec, columns: list[str]) -> None:
    wanted = [spec.label_column] if spec.label_column else list(spec.label_columns)
    missing = [c for c in wanted if c not in columns]
    if missing:
        guess = guess_preset(columns)
        raise ScanError(
            f"Metadata has no label column(s) {missing}; its columns are {columns}. Pass --label-column NAME"
            + (f", or --preset {guess}." if guess and guess != spec.preset else ".")
        )
    missing = [c for c in spec.group_columns if c not in columns]
    if missing:
        raise ScanError(
            f"Metadata has no group column(s) {missing}; its columns are {columns}. "
            + (f"{spec.hint}. " if spec.hint else "")
            + "Pass the right --group-column, or --group-column none to split image by image (this can leak "
            "images of one patient or lesion across splits)."
        )


# ---- the scan --------------------------------------------------------------------------------------------


@dataclass
class MetadataScan(ScanResult):
    """A :class:`ScanResult` whose files come from a metadata table, with each file's extra columns."""

    extra: list[dict[str, Any]] = field(default_factory=list)  # per file: metadata column -> encoded value
    group_keys: list[tuple[str, ...]] = field(default_factory=list)  # per file: "column=value" of group columns
    features: dict[str, Any] = field(default_factory=dict)  # metadata column -> datasets feature
    report: dict[str, Any] = field(default_factory=dict)


def _class_of(raw: str, class_map: Mapping[str, str | None]) -> tuple[str | None, str]:
    if raw in class_map:
        target = class_map[raw]
        return (target, "") if target is not None else (None, "dropped_class")
    if raw.lower() in UNKNOWN_LABELS:
        return None, "unknown_label"
    return raw, ""


def _label_of(row: Mapping[str, str | None], spec: MetadataSpec, class_map: Mapping[str, str | None]) -> str | None:
    raw, _ = _raw_label(row, spec)
    return None if raw is None else class_map.get(raw, raw)


def _conflict(
    skip: dict[str, Any], kept: Mapping[str, str | None], other: Mapping[str, str | None], spec: MetadataSpec,
    class_map: Mapping[str, str | None], where: str,
) -> bool:
    """Turn a repeated row's ``duplicate_row`` skip into a ``conflict`` when its label differs from the kept row's."""
    a, b = _label_of(kept, spec, class_map), _label_of(other, spec, class_map)
    if a is None or b is None or a == b:
        return False
    skip["reason"] = "conflict"
    skip["detail"] = f"label {b!r} here, {a!r} in {where}"
    return True


def _match_rows(
    table: Table, spec: MetadataSpec, index: FileIndex, paths: list[str], class_map: Mapping[str, str | None]
) -> tuple[dict[int, int], dict[int, str], dict[int, int], list[dict[str, Any]], dict[int, list[str]]]:
    """Each row to the one file it names: (file -> row, files a name matches ambiguously -> that name,
    byte-identical copies -> the file kept, the rows skipped with their reason, rows whose image another row
    labels differently -> those rows' "file:line")."""
    claimed: dict[int, int] = {}
    ambiguous: dict[int, str] = {}
    copy_of: dict[int, int] = {}
    conflicts: dict[int, list[str]] = {}
    row_skips = list(table.skipped)
    for r, skip, cells in table.repeats:
        if _conflict(skip, table.rows[r], cells, spec, class_map, table.where[r]):
            conflicts.setdefault(r, []).append(skip["row"])
    for r, row in enumerate(table.rows):
        image = row[spec.image_column]
        found = index.candidates(image)
        if len(found) > 1 and _identical([paths[i] for i in found]):
            for i in found[1:]:
                copy_of[i] = found[0]
            found = found[:1]
        if not found:
            row_skips.append({"row": table.where[r], "image": image, "reason": "image_not_found", "detail": ""})
        elif len(found) > 1:
            names = [index.rels[i] for i in found]
            row_skips.append(
                {"row": table.where[r], "image": image, "reason": "ambiguous_image", "detail": ", ".join(names[:5])}
            )
            for i in found:
                ambiguous.setdefault(i, image)
        elif found[0] in claimed:
            kept = claimed[found[0]]
            skip = {"row": table.where[r], "image": image, "reason": "duplicate_row",
                    "detail": f"same file as {table.where[kept]}"}
            row_skips.append(skip)
            if _conflict(skip, table.rows[kept], row, spec, class_map, table.where[kept]):
                conflicts.setdefault(kept, []).append(skip["row"])
        else:
            claimed[found[0]] = r
    return claimed, ambiguous, copy_of, row_skips, conflicts


def _type_columns(
    table: Table, spec: MetadataSpec, carried: list[str], matched_rows: list[int]
) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, str], dict[str, str]]:
    """The carried columns as typed dataset features (names clashing with ours get a ``meta_`` prefix):
    (features, encoded values per matched row, kinds, renamed columns)."""
    features: dict[str, Any] = {}
    encoded: dict[str, list[Any]] = {}
    types: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for column in carried:
        name = f"meta_{column}" if column in _RESERVED else column
        if name != column:
            renamed[column] = name
        cells = [table.rows[r][column] for r in matched_rows]
        feature, values, kind = infer_feature(cells, categorical=column not in spec.group_columns)
        features[name], encoded[name], types[name] = feature, values, kind
    return features, encoded, types, renamed


def scan_metadata(
    src: Path,
    spec: MetadataSpec,
    class_map: Mapping[str, str | None] | None = None,
    *,
    follow_external_links: bool = False,
) -> MetadataScan:
    """Match the table's rows to the files under ``src``; type the other columns; account for everything."""
    class_map = dict(class_map or {})
    table = load_tables(spec.files, spec.image_column, spec.na_values)
    _check_label_columns(spec, table.columns)
    index, paths, skipped = index_files(src, spec.files, follow_external_links)

    claimed, ambiguous, copy_of, row_skips, conflicts = _match_rows(table, spec, index, paths, class_map)

    raw_labels = {_raw_label(table.rows[r], spec)[0] for r in claimed.values()} - {None}
    unknown_keys = sorted(set(class_map) - raw_labels)
    if unknown_keys:
        raise ScanError(
            f"Class map names labels that no matched row carries: {unknown_keys}. "
            f"Labels found: {sorted(raw_labels)[:50]}."
        )

    consumed = {spec.image_column, *([spec.label_column] if spec.label_column else spec.label_columns)}
    carried = [c for c in table.columns if c not in consumed]
    matched_rows = sorted(claimed.values())
    features, encoded, types, renamed = _type_columns(table, spec, carried, matched_rows)
    position = {r: k for k, r in enumerate(matched_rows)}

    files: list[SourceFile] = []
    extra: list[dict[str, Any]] = []
    group_keys: list[tuple[str, ...]] = []
    folders: dict[str, str | None] = {}
    for i, rel in enumerate(index.rels):
        if i in copy_of:
            skipped.append(Skip(rel, "duplicate_file", f"byte-identical copy of {index.rels[copy_of[i]]}"))
            continue
        if i in ambiguous:
            skipped.append(Skip(rel, "ambiguous_match", f"the name {ambiguous[i]!r} matches several files"))
            continue
        r = claimed.get(i)
        if r is None:
            skipped.append(Skip(rel, "no_metadata_row", f"no row of the metadata names {Path(rel).name}"))
            continue
        if r in conflicts:  # rows that disagree on the label: neither is believed
            rows = ", ".join([table.where[r], *conflicts[r]])
            skipped.append(Skip(rel, "conflict", f"metadata rows {rows} give it different labels"))
            continue
        raw, reason = _raw_label(table.rows[r], spec)
        target = None
        if raw is not None:
            target, reason = _class_of(raw, class_map)
            folders[raw] = class_map.get(raw, raw) if reason != "unknown_label" else None
        if target is None:
            skipped.append(Skip(rel, reason, f"row {table.where[r]}"))
            continue
        files.append(SourceFile(rel, paths[i], "", target))
        k = position[r]
        extra.append({name: encoded[name][k] for name in features})
        group_keys.append(tuple(f"{g}={table.rows[r][g]}" for g in spec.group_columns if table.rows[r][g] is not None))

    rows_total = len(table.rows) + len(table.skipped)
    if len(claimed) + len(row_skips) != rows_total:
        raise RuntimeError(
            f"metadata accounting is off: {rows_total} rows, {len(claimed)} matched, {len(row_skips)} skipped"
        )
    if not claimed:
        sample_rows = [row[spec.image_column] for row in table.rows[:3]]
        raise ScanError(
            f"No row of {', '.join(p.name for p in spec.files)} matches a file under {src}: the image column "
            f"{spec.image_column!r} holds e.g. {sample_rows}, the files are e.g. {index.rels[:3]}. Rows are "
            "matched by file name, with or without extension, or by a path relative to SRC."
        )
    if not files:
        reasons = dict(Counter(s.reason for s in skipped))
        raise ScanError(
            f"{len(claimed)} rows matched a file under {src}, but none has a usable label (files skipped: {reasons}). "
            f"Check --label-column ({spec.label_column or ','.join(spec.label_columns)}) and --class-map."
        )
    report = {
        **spec.as_dict(),
        "rows_total": rows_total,
        "rows_matched": len(claimed),
        "rows_skipped_total": len(row_skips),
        "rows_skipped_by_reason": dict(sorted(Counter(s["reason"] for s in row_skips).items())),
        "rows_skipped": sorted(row_skips, key=lambda s: (s["reason"], s["row"])),
        "columns": types,
        "renamed_columns": renamed,
        "unnamed_columns_left_out": table.unnamed_columns,
    }
    return MetadataScan(
        files=files,
        skipped=skipped,
        class_names=sorted({f.class_name for f in files}),
        layout="metadata",
        folders=dict(sorted(folders.items())),
        extra=extra,
        group_keys=group_keys,
        features=features,
        report=report,
    )


# ---- convert's hooks -------------------------------------------------------------------------------------


def with_metadata_features(features: Features, scan: ScanResult) -> Features:
    """The dataset schema plus the typed metadata columns (unchanged for class folders)."""
    if isinstance(scan, MetadataScan):
        features = Features({**features, **scan.features})
    return features


def row_metadata(scan: ScanResult, file_index: int) -> dict[str, Any]:
    return scan.extra[file_index] if isinstance(scan, MetadataScan) else {}


def join_groups(
    groups: list[list[int]], scan: ScanResult, row_files: Sequence[int]
) -> tuple[list[list[int]], dict[str, Any] | None]:
    """Merge duplicate groups whose rows share a value of a group column (patient, lesion).

    ``groups`` hold row indices; ``row_files[row]`` is the row's file index. Empty group cells join nothing.
    """
    if not isinstance(scan, MetadataScan) or not any(scan.group_keys):
        return groups, None
    uf = UnionFind(len(groups))
    first: dict[str, int] = {}
    for g, members in enumerate(groups):
        for row in members:
            for key in scan.group_keys[row_files[row]]:
                uf.union(first.setdefault(key, g), g)
    merged = [sorted(i for g in unit for i in groups[g]) for unit in uf.groups()]
    merged.sort(key=lambda m: m[0])
    return merged, {
        "columns": sorted({k.split("=", 1)[0] for keys in scan.group_keys for k in keys}),
        "units": len(merged),
        "units_with_several_images": sum(len(m) > 1 for m in merged),
        "largest_unit": max((len(m) for m in merged), default=0),
        "how": "rows sharing a value of any group column, and their exact or near copies, form one unit that "
        "lies wholly in one split; empty group cells join nothing",
    }


def unit_label(rows: Sequence[int], labels: Sequence[int]) -> int:
    """The label a unit is stratified by: its most common label (a patient can have several)."""
    return Counter(labels[i] for i in rows).most_common(1)[0][0]


def card_lines(report: Mapping[str, Any]) -> list[str]:
    """Dataset-card lines: the source table, its typed columns and what was not matched."""
    meta = report.get("metadata")
    if not meta:
        return []
    label = meta["label_column"] or "one-hot columns " + ", ".join(meta["label_columns"])
    lines = [
        "",
        f"Labels and metadata come from {', '.join(f'`{f}`' for f in meta['files'])}"
        + (f" (preset `{meta['preset']}`)" if meta.get("preset") else "")
        + f": image column `{meta['image_column']}`, label from {label}. Metadata columns carried (empty "
        "cells are null):",
        "",
        "| column | type |",
        "|---|---|",
        *[f"| {md_code(c)} | {t} |" for c, t in meta["columns"].items()],
        "",
        f"{meta['rows_matched']} of {meta['rows_total']} table rows matched an image.",
    ]
    if meta["rows_skipped_by_reason"]:
        lines.append(
            "Rows not used: "
            + ", ".join(f"{n} {r} ({ROW_REASONS.get(r, '')})" for r, n in meta["rows_skipped_by_reason"].items())
            + "; each is listed in `conversion_report.json`."
        )
    grouping = report.get("grouping")
    if grouping:
        lines += [
            "",
            f"Images sharing {', '.join(f'`{c}`' for c in grouping['columns'])} were kept in one split: "
            f"{grouping['units']} units, {grouping['units_with_several_images']} with several images, the "
            f"largest {grouping['largest_unit']}.",
        ]
    return lines
