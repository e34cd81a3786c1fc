"""The conversion report: each source file is a row or a skip with its reason, and the totals prove it."""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from derm_accel.core.artifacts import CONVERSION_REPORT
from derm_accel.core.errors import RunError
from derm_accel.core.fileio import atomic_write_json, read_optional_json
from derm_accel.core.paths import fit_name
from derm_accel.core.version import __version__
from derm_accel.data.scan import Skip
from derm_accel.data.split import SPLITS

REPORT_NAME = CONVERSION_REPORT


class AccountingError(RunError):
    """Rows and skips do not add up to the files found: a bug, never a user error."""


def versions() -> dict[str, str]:
    """Library versions that decide the bytes written (JPEG encoder, hashes, Arrow)."""
    import datasets
    import numpy
    import PIL
    import pyarrow
    import scipy


    return {
        "derm_accel": __version__,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
        "pillow": PIL.__version__,
        "scipy": scipy.__version__,  # the DCT of the perceptual hash (imagehash's algorithm, computed here)
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


def is_failed_conversion(out: Path) -> bool:
    """``out`` holds nothing but the report of a conversion that failed (so a new run may replace it)."""
    try:
        if not out.is_dir() or [p.name for p in out.iterdir()] != [REPORT_NAME]:
            return False
        return json.loads((out / REPORT_NAME).read_text(encoding="utf-8")).get("status") == "failed"
    except (OSError, ValueError, AttributeError):
        return False


def write_failure_report(out: Path, report: dict[str, Any]) -> Path:
    """Write the report of a failed conversion where the user looks for it: ``OUT/conversion_report.json``,
    unless OUT holds an earlier conversion (kept untouched), then beside it as ``OUT.failed-report.json``."""
    holds_dataset = out.is_dir() and any(out.iterdir()) and not is_failed_conversion(out)
    path = out.with_name(fit_name(out.name, ".failed-report.json")) if holds_dataset else out / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, {"status": "failed", **report})


def dataset_provenance(data_path: str | os.PathLike) -> dict[str, Any]:
    """What training records about its converted dataset for the card: the source folder's name (not the local
    ``data/`` path), and the Hub dataset id and license when ``convert`` recorded them."""
    report = read_optional_json(Path(data_path) / CONVERSION_REPORT)
    info = {
        "name": Path(str(report.get("src") or data_path)).name,
        "hub_id": report.get("push_to_hub"),
        "license": report.get("license"),
    }
    return {k: v for k, v in info.items() if v} if report else {}
