"""Find every file under SRC and say which class (and, for pre-split trees, which split) it belongs to.

Nothing is opened here. Files that cannot become rows whatever their content (hidden files, files outside a
class folder, folders mapped to null) are returned as skips so that the report can account for every file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from derm_accel.core.errors import InputError

SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
SPLIT_ORDER = ("train", "validation", "test")


class ScanError(InputError):
    """SRC or the class map cannot be used as given."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate image: ``rel`` is the posix path relative to SRC."""

    rel: str
    path: str
    folder: str
    class_name: str
    split: str | None = None


@dataclass
class Skip:
    """A file that will not become a row, and why."""

    path: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


@dataclass
class ScanResult:
    files: list[SourceFile]
    skipped: list[Skip]
    class_names: list[str]
    layout: str  # "class_folders" or "pre_split"
    folders: dict[str, str | None] = field(default_factory=dict)  # folder -> class (None: dropped)
    empty_folders: list[str] = field(default_factory=list)
    split_folders: dict[str, str] = field(default_factory=dict)  # folder on disk -> split name


def load_class_map(class_map: str | os.PathLike | Mapping | None) -> dict[str, str | None]:
    """Read a folder -> class mapping from a dict or a YAML/JSON file; ``null`` drops a folder."""
    if class_map is None:
        return {}
    if isinstance(class_map, Mapping):
        raw: object = dict(class_map)
        origin = "class_map"
    else:
        path = Path(class_map)
        if not path.is_file():
            raise ScanError(
                f"Class map {path} does not exist; pass a YAML or JSON file mapping folder: class."
            )
        text = path.read_text(encoding="utf-8")
        try:
            raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ScanError(
                f"Class map {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"
            ) from exc
        origin = str(path)
    if not isinstance(raw, dict):
        raise ScanError(
            f"{origin} must be a mapping of folder name -> class name (or null to drop the folder)."
        )
    out: dict[str, str | None] = {}
    for key, value in raw.items():
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ScanError(
                f"{origin}: folder '{key}' maps to {value!r}; use a non-empty class name, or null to drop it."
            )
        out[str(key)] = value.strip() if isinstance(value, str) else None
    return out


def is_hidden(rel_parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in rel_parts)


def walk_files(root: Path) -> list[Path]:
    """All files under ``root`` (following folder links once; cycles are cut), sorted for determinism."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in filenames)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def leaves_tree(path: Path, root_real: str) -> bool:
    """Whether ``path`` (through file or folder links) resolves to a place outside ``root_real``."""
    real = os.path.realpath(path)
    return os.path.commonpath([real, root_real]) != root_real


def scan_source(
    src: Path, class_map: Mapping[str, str | None] | None = None, *, follow_external_links: bool = False
) -> ScanResult:
    """List SRC's files with their class; detect a pre-split tree (train/ + val|validation/ + test/).

    A file reached through a link that leads outside SRC is skipped (``external_link``) unless
    ``follow_external_links``: a stray link must not pull someone else's files into a dataset.
    """
    class_map = dict(class_map or {})
    root_real = os.path.realpath(src)
    top_dirs = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    pre_split = bool(top_dirs) and "train" in top_dirs and all(d in SPLIT_FOLDERS for d in top_dirs)
    split_like = [d for d in top_dirs if d in SPLIT_FOLDERS]
    if split_like and not pre_split:
        # Split folders beside other folders: neither a clean pre-split tree nor classes named "train"/"test".
        raise ScanError(
            f"{src} mixes split folders {split_like} with other folders {sorted(set(top_dirs) - set(split_like))}. "
            f"Move the others into the splits' class folders, or out of {src}."
        )
    if pre_split and "val" in top_dirs and "validation" in top_dirs:
        raise ScanError(f"{src} has both val/ and validation/; merge them into one folder.")
    depth = 2 if pre_split else 1  # path parts before the class folder's content
    split_folders = {d: SPLIT_FOLDERS[d] for d in top_dirs} if pre_split else {}

    class_folders: set[str] = set()
    for split_dir in (src / d for d in top_dirs) if pre_split else [src]:
        class_folders.update(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = sorted(set(class_map) - class_folders)
    if unknown:
        raise ScanError(
            f"Class map names folders that are not class folders of {src}: {unknown}. "
            f"Known folders: {sorted(class_folders)}."
        )
    folders = {name: class_map.get(name, name) for name in sorted(class_folders)}

    files: list[SourceFile] = []
    skipped: list[Skip] = []
    folders_with_files: set[str] = set()
    for path in walk_files(src):
        rel_path = path.relative_to(src)
        rel = rel_path.as_posix()
        parts = rel_path.parts
        if is_hidden(parts):
            skipped.append(Skip(rel, "hidden", "file or folder name starts with '.'"))
            continue
        if not follow_external_links and leaves_tree(path, root_real):
            skipped.append(
                Skip(rel, "external_link", "a link leads outside SRC; pass --follow-external-links to include it")
            )
            continue
        if len(parts) <= depth:
            where = "a split folder" if pre_split and len(parts) == 2 else "SRC"
            skipped.append(
                Skip(rel, "outside_class_folder", f"file lies directly in {where}, not in a class folder")
            )
            continue
        folder = parts[depth - 1]
        folders_with_files.add(folder)
        target = folders[folder]
        if target is None:
            skipped.append(Skip(rel, "dropped_class", f"class map drops folder '{folder}'"))
            continue
        split = split_folders[parts[0]] if pre_split else None
        files.append(SourceFile(rel, str(path), folder, target, split))

    empty = sorted(class_folders - folders_with_files)
    class_names = sorted({f.class_name for f in files})
    return ScanResult(
        files=files,
        skipped=skipped,
        class_names=class_names,
        layout="pre_split" if pre_split else "class_folders",
        folders=folders,
        empty_folders=empty,
        split_folders=split_folders,
    )
