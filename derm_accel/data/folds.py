"""k-fold cross-validation on a converted dataset: folds, per-fold datasets, and statistics over folds.

All splits of the converted dataset are pooled, then assigned to folds with scikit-learn's
``StratifiedGroupKFold``: each fold keeps the class mix, and every duplicate group (exact copies and near
copies, the same grouping ``convert`` uses) or patient (an optional column such as ``patient_id``) lies in one
fold only, so no image is scored by a model that trained on its copy. Each fold is written as a normal
converted dataset: ``train`` and ``validation`` (a grouped, stratified tenth of the training folds, for picking
the best epoch) from the other folds, ``test`` the held-out fold.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm_accel.core.errors import InputError
from derm_accel.data.decode import phash_variants
from derm_accel.data.dedupe import UnionFind, group_images
from derm_accel.data.split import stratified_group_split
from derm_accel.data.transforms import decode_image

SPLITS = ("train", "validation", "test")
DEFAULT_NEAR_THRESHOLD = 4  # convert's default
INNER_VAL_FRAC = 0.1


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def pooled_rows(data: str | Path) -> Any:
    """Every row of every split of a converted dataset, as one ``Dataset`` sorted by ``source_path``.

    Sorting makes the fold assignment independent of how convert split the rows, so two conversions of the
    same folders (e.g. at two image sizes) get the same folds.
    """
    from datasets import concatenate_datasets, load_from_disk

    if not (Path(data) / "dataset_dict.json").exists():
        raise FileNotFoundError(f"{data} is not a dataset written by `derm-accel convert` (no dataset_dict.json)")
    dataset = load_from_disk(str(data))
    pooled = concatenate_datasets([dataset[s] for s in dataset])
    order = np.argsort(np.asarray(pooled["source_path"], dtype=object), kind="stable")
    return pooled.select(order.tolist())


def near_threshold(data: str | Path) -> int:
    """The near-duplicate threshold the dataset was converted with (its conversion report), else convert's."""
    report = Path(data) / "conversion_report.json"
    if report.is_file():
        return int(json.loads(report.read_text()).get("parameters", {}).get("near_threshold", DEFAULT_NEAR_THRESHOLD))
    return DEFAULT_NEAR_THRESHOLD


def duplicate_groups(rows: Any, threshold: int = DEFAULT_NEAR_THRESHOLD, group_column: str | None = None) -> np.ndarray:
    """A group id per row: convert's duplicate grouping, joined with ``group_column`` (e.g. patient) if given.

    Exact copies share ``content_hash``; near copies have pHashes within ``threshold`` bits in any of the 8
    orientations (recomputed from the stored images, as convert does from the originals).
    """
    from datasets import Image as ImageFeature

    images = rows.cast_column("image", ImageFeature(decode=False))["image"]
    variants = np.array([phash_variants(decode_image(cell)) for cell in images], dtype=np.uint64)
    phashes = [f"{int(v):016x}" for v in variants[:, 0]]
    groups = group_images(rows["content_hash"], phashes, threshold, variants)
    uf = UnionFind(len(rows))
    for group in groups:
        for i in group[1:]:
            uf.union(group[0], i)
    if group_column is not None:
        if group_column not in rows.column_names:
            raise ValueError(
                f"group column '{group_column}' is not in the dataset (columns: {', '.join(rows.column_names)})"
            )
        first: dict[Any, int] = {}
        for i, key in enumerate(rows[group_column]):
            if key is not None and key != "":
                uf.union(first.setdefault(key, i), i)
    ids = np.empty(len(rows), dtype=np.int64)
    for gid, members in enumerate(uf.groups()):
        ids[members] = gid
    return ids


def assign_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of every row: stratified by label, no group in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    if folds < 2:
        raise ValueError(f"k-fold cross-validation needs at least 2 folds, got {folds}")
    if len(np.unique(groups)) < folds:
        raise ValueError(f"{len(np.unique(groups))} duplicate groups cannot fill {folds} folds; use fewer folds")
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold_of[held_out] = k
    return fold_of


def inner_validation(labels: np.ndarray, groups: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """A grouped, stratified ``INNER_VAL_FRAC`` of ``rows`` (the training folds) for picking the best epoch."""
    member_groups: dict[int, list[int]] = {}
    for r in rows.tolist():
        member_groups.setdefault(int(groups[r]), []).append(r)
    keys = sorted(member_groups)
    splits = stratified_group_split(
        [int(labels[member_groups[g][0]]) for g in keys],
        [len(member_groups[g]) for g in keys],
        [str(g) for g in keys],
        val_frac=INNER_VAL_FRAC,
        test_frac=0.0,
        seed=seed,
    )
    return np.array(sorted(r for g, s in zip(keys, splits, strict=True) if s == "validation" for r in member_groups[g]))


def write_fold(rows: Any, fold_of: np.ndarray, groups: np.ndarray, fold: int, out: str | Path, seed: int = 0) -> Path:
    """Write fold ``fold`` as a converted dataset at ``out``: train/validation from the other folds, test held out."""
    from datasets import DatasetDict

    labels = np.asarray(rows["label"])
    rest = np.flatnonzero(fold_of != fold)
    val = inner_validation(labels, groups, rest, seed + fold)
    parts = {
        "train": np.setdiff1d(rest, val),
        "validation": val,
        "test": np.flatnonzero(fold_of == fold),
    }
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    with _quiet():
        DatasetDict({s: rows.select(parts[s].tolist()) for s in SPLITS}).save_to_disk(str(out))
    return out


def without_holdout(rows: Any, groups: np.ndarray, data: str | Path, holdout: str) -> tuple[Any, np.ndarray, int]:
    """The rows outside the ``holdout`` split, less those that share a duplicate or patient group with a held-out
    row (else a copy of a held-out image, or the same patient, would train the models judged on it)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(data))
    if holdout not in dataset:
        raise InputError(f"{data} has no '{holdout}' split to hold out (it has {sorted(dataset)}); fix --holdout.")
    held = np.isin(np.asarray(rows["source_path"], dtype=object), np.asarray(dataset[holdout]["source_path"]))
    keep = ~held & ~np.isin(groups, np.unique(groups[held]))
    return rows.select(np.flatnonzero(keep).tolist()), groups[keep], int((~held & ~keep).sum())


def make_fold_datasets(
    data: str | Path,
    out_dir: str | Path,
    folds: int,
    *,
    seed: int = 0,
    group_column: str | None = None,
    trained: Sequence[Path] = (),
    holdout: str | None = None,
) -> list[Path]:
    """``out_dir/fold_1 .. fold_K``: one converted dataset per fold (reused when the assignment is unchanged).

    ``trained`` lists fold runs that already exist: a changed assignment is then refused, since their models
    may have trained on images that the new folds hold out. ``holdout`` names a split kept out of every fold.
    """
    out_dir = Path(out_dir)
    rows = pooled_rows(data)  # the holdout too: duplicate and patient groups are found across all splits
    groups = duplicate_groups(rows, near_threshold(data), group_column)
    near_holdout = 0
    if holdout:
        rows, groups, near_holdout = without_holdout(rows, groups, data, holdout)
    fold_of = assign_folds(np.asarray(rows["label"]), groups, folds, seed)
    assignment = {
        "data": str(Path(data).resolve()),
        "folds": folds,
        "seed": seed,
        "group_column": group_column,
        # absent when unset: earlier manifests stay valid
        **({"holdout": holdout, "dropped_as_copies_of_holdout": near_holdout} if holdout else {}),
        "source_paths": list(rows["source_path"]),
        "fold": fold_of.tolist(),
        "group": groups.tolist(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "folds.json"
    fresh = not manifest.is_file() or json.loads(manifest.read_text()) != assignment
    if fresh and manifest.is_file() and trained:
        raise InputError(
            f"{', '.join(str(p) for p in trained)} were trained on another fold assignment (the data, --folds, "
            f"the seed, --group-column, --holdout or the images changed), so their models may have seen the new "
            f"held-out images. Use a new output_dir (--set output_dir=runs/NEW), or delete those fold runs."
        )
    paths = []
    for k in range(folds):
        path = out_dir / f"fold_{k + 1}"
        if fresh or not (path / "dataset_dict.json").is_file():
            write_fold(rows, fold_of, groups, k, path, seed)
        paths.append(path)
    manifest.write_text(json.dumps(assignment) + "\n")
    return paths


