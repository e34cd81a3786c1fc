"""Paths as they may appear in files that get published (model repos, dataset repos)."""

from __future__ import annotations

import os
from pathlib import Path


def shareable_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it, else its last two parts.

    Reports, metrics and training info travel to the Hub with the model; a user's absolute directory layout
    (home folder, user name, mount points) must not travel with them.
    """
    p = Path(path)
    if not p.is_absolute() and ".." not in p.parts:
        return p.as_posix()
    resolved = p.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(*resolved.parts[-2:]).as_posix()


# Longest file name (bytes) on ext4, XFS, btrfs, APFS and NTFS alike.
NAME_MAX = 255


def fit_name(stem: str, suffix: str = "", limit: int = NAME_MAX) -> str:
    """``stem + suffix`` as a file name of at most ``limit`` UTF-8 bytes.

    A stem that does not fit is cut at a character boundary and tagged with 8 hex digits of its sha256, so
    two long names that differ only past the cut still give two different files.
    """
    name = stem + suffix
    if len(name.encode()) <= limit:
        return name
    import hashlib

    tag = "~" + hashlib.sha256(stem.encode()).hexdigest()[:8]
    room = limit - len((tag + suffix).encode())
    if room < 1:
        raise ValueError(f"a file name ending in {suffix!r} cannot fit in {limit} bytes")
    return stem.encode()[:room].decode("utf-8", "ignore") + tag + suffix


def temp_prefix(name: str, marker: str = ".") -> str:
    """A ``tempfile.mkdtemp`` prefix for a hidden sibling of ``name`` that stays within :data:`NAME_MAX`
    once mkdtemp appends its 8 random characters."""
    return fit_name(f".{name}", marker, NAME_MAX - 8)
