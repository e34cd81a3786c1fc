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
