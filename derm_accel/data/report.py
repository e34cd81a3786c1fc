"""The conversion report: each source file is a row or a skip with its reason, and the totals prove it."""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from derm_accel.data.scan import Skip
from derm_accel.data.split import SPLITS

REPORT_NAME = "conversion_report.json"


class AccountingError(RuntimeError):
    """Rows and skips do not add up to the files found: a bug, never a user error."""


def versions() -> dict[str, str]:
    """Library versions that decide the bytes written (JPEG encoder, hashes, Arrow)."""
    import datasets
    import imagehash
    import numpy
    import PIL
    import pyarrow

    import derm_accel

    return {
        "derm_accel": derm_accel.__version__,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
        "pillow": PIL.__version__,
        "imagehash": imagehash.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def split_counts(
    rows_by_split: dict[str, Sequence[int]], labels: Sequence[int], class_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Rows per split and per class within each split."""
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        rows = rows_by_split.get(split, [])
        counts = Counter(labels[i] for i in rows)
        out[split] = {
            "rows": len(rows),
            "per_class": {name: counts.get(c, 0) for c, name in enumerate(class_names)},
        }
    return out


def check_accounting(all_files: Iterable[str], row_paths: Iterable[str], skipped: Sequence[Skip]) -> None:
    """Each file is exactly one row or one skip; raise otherwise (explicit check, survives ``python -O``)."""
    files = list(all_files)
    rows = list(row_paths)
    skip_paths = [s.path for s in skipped]
    seen = Counter(rows) + Counter(skip_paths)
    twice = [p for p, n in seen.items() if n > 1]
    missing = sorted(set(files) - set(seen))
    extra = sorted(set(seen) - set(files))
    if twice or missing or extra or len(rows) + len(skip_paths) != len(files):
        raise AccountingError(
            f"conversion accounting is off: {len(files)} files, {len(rows)} rows, {len(skip_paths)} skipped; "
            f"counted twice {twice[:5]}, missing {missing[:5]}, unknown {extra[:5]}"
        )
