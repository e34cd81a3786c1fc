"""Writing files and folders so that a crash or a kill never leaves half of one where a reader looks.

Every stage writes its outputs through these: a JSON file is written beside its destination and renamed over
it (:func:`atomic_write_json`); a folder is built under a hidden temporary name and swapped in when complete
(:func:`staged_dir`, :func:`replace_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from derm_accel.core.paths import fit_name, temp_prefix


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a hidden sibling renamed over it: readers see the old file or
    the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(fit_name(f".{path.name}", ".tmp"))
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, *, default: Callable[[Any], Any] | None = None) -> Path:
    """``data`` as indented JSON (UTF-8, non-ASCII kept, trailing newline), written atomically.
    ``default`` converts values JSON lacks (e.g. ``str`` for paths)."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=default) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the finished folder ``new`` to ``dest`` (same file system). An existing ``dest`` (folder or file)
    is renamed aside first and removed only once ``new`` is in place; if that move fails it is put back."""
    new, dest = Path(new), Path(dest)
    if not dest.exists() and not dest.is_symlink():
        new.rename(dest)
        return dest
    old = dest.with_name(fit_name(f".{dest.name}", f".old-{os.getpid()}"))
    _remove(old)
    dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    _remove(old)
    return dest


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, marker: str = ".") -> Iterator[Path]:
    """A new hidden folder beside ``dest`` to build the output in; when the block ends without an error it
    replaces ``dest`` (:func:`replace_dir`), otherwise it is removed and ``dest`` stays as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name, marker), dir=dest.parent))
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_optional(path: Path, parse: Callable[[str], Any], errors: type[Exception] | tuple, kind: str) -> dict:
    """A mapping from ``path``, or ``{}`` if the file is absent (every side file of a run is optional)."""
    if not path.is_file():
        return {}
    try:
        data = parse(path.read_text())
    except errors as e:
        raise ValueError(f"{path} is not valid {kind} ({e}); fix or remove it.") from e
    return data if isinstance(data, dict) else {}


def read_optional_json(path: Path) -> dict[str, Any]:
    return _read_optional(path, json.loads, json.JSONDecodeError, "JSON")


def read_optional_yaml(path: Path) -> dict[str, Any]:
    return _read_optional(path, yaml.safe_load, yaml.YAMLError, "YAML")
