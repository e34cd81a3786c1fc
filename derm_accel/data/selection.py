"""A converted dataset on disk, or an index selection of one: the folder every stage takes as ``--data``.

``train --folds K`` cuts K folds from one converted dataset. A fold is not a copy of its images: its folder
holds ``selection.json``, the rows of each of its splits as indices into the source dataset's splits laid end
to end (in the order of its ``dataset_dict.json``), with the source's path, row counts and fingerprints.
:func:`load_converted` opens either kind as a ``DatasetDict``; a selection's splits are ``Dataset.select``
views of the memory-mapped source, so K folds of a 11 GB collection cost a few MB of indices, not K x 11 GB.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm_accel.core.errors import InputError
from derm_accel.core.fileio import atomic_write_text

SELECTION_FILE = "selection.json"
DATASET_DICT_FILE = "dataset_dict.json"
FORMAT = "derm-accel index selection"


class SelectionError(InputError):
    """A selection's source dataset is missing or is no longer the dataset the selection was cut from."""


def is_converted(path: str | Path) -> bool:
    """True for a folder ``load_converted`` opens: a saved DatasetDict or an index selection of one."""
    path = Path(path)
    return (path / DATASET_DICT_FILE).is_file() or (path / SELECTION_FILE).is_file()


def split_names(data: str | Path) -> list[str]:
    """The splits of a saved DatasetDict, in the order ``load_from_disk`` returns them."""
    return list(json.loads((Path(data) / DATASET_DICT_FILE).read_text())["splits"])


def _fingerprints(data: Path, splits: Sequence[str]) -> dict[str, str | None]:
    """Each split's fingerprint as ``save_to_disk`` recorded it (``SPLIT/state.json``): it changes when the
    split is written again with other content."""
    out: dict[str, str | None] = {}
    for split in splits:
        state = data / split / "state.json"
        out[split] = json.loads(state.read_text()).get("_fingerprint") if state.is_file() else None
    return out


def source_layout(source: Any, data: str | Path) -> dict[str, Any]:
    """What a selection of ``source`` (the DatasetDict loaded from ``data``) records to find its rows again."""
    data = Path(data).resolve()
    splits = list(source)
    return {
        "data": str(data),
        "source_splits": splits,
        "source_rows": {s: len(source[s]) for s in splits},
        "source_fingerprints": _fingerprints(data, splits),
    }


def write_selection(out: str | Path, layout: Mapping[str, Any], rows: Mapping[str, np.ndarray]) -> Path:
    """``out/selection.json``: the splits ``rows`` (indices into the source's splits laid end to end)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(layout["source_rows"].values())
    splits: dict[str, list[int]] = {}
    for name, indices in rows.items():
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= total):
            raise ValueError(f"split {name!r} selects rows outside 0..{total - 1}")
        splits[name] = indices.tolist()
    manifest = {"format": FORMAT, "format_version": 1, **layout, "splits": splits}
    return atomic_write_text(out / SELECTION_FILE, json.dumps(manifest, separators=(",", ":")) + "\n")  # ~7 B a row


def _load_selection(path: Path) -> Any:
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    manifest = json.loads((path / SELECTION_FILE).read_text())
    if manifest.get("format") != FORMAT:
        raise SelectionError(f"{path / SELECTION_FILE} is not a derm-accel index selection (format field).")
    data = Path(manifest["data"])
    if not (data / DATASET_DICT_FILE).is_file():
        raise SelectionError(
            f"{path} selects rows of {data}, which is not there any more; restore that dataset, or run "
            f"`derm-accel train --folds` again to cut the folds from the dataset you have."
        )
    source = load_from_disk(str(data))
    found = source_layout(source, data)
    for key in ("source_splits", "source_rows", "source_fingerprints"):
        if found[key] != manifest[key]:
            raise SelectionError(
                f"{data} changed since {path} was cut from it ({key}: {manifest[key]} then, {found[key]} now), "
                f"so its indices would pick other images. Run `derm-accel train --folds` again with a new "
                f"output_dir to cut new folds."
            )
    pooled = concatenate_datasets([source[s] for s in manifest["source_splits"]])
    return DatasetDict({name: pooled.select(rows) for name, rows in manifest["splits"].items()})


def load_converted(path: str | Path) -> Any:
    """The ``DatasetDict`` at ``path``: written by ``derm-accel convert`` (``datasets.load_from_disk``), or an
    index selection of one (``selection.json``; no rows are copied)."""
    from datasets import load_from_disk

    path = Path(path)
    if (path / SELECTION_FILE).is_file():
        return _load_selection(path)
    if not (path / DATASET_DICT_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a dataset written by `derm-accel convert` (no {DATASET_DICT_FILE}); pass the folder "
            f"convert wrote."
        )
    return load_from_disk(str(path))
