"""k-fold cross-validation on a converted dataset: folds, per-fold datasets, and statistics over folds.

All splits of the converted dataset are pooled, then assigned to folds with scikit-learn's
``StratifiedGroupKFold``: each fold keeps the class mix, and every unit convert grouped (exact and near copies,
patients/lesions; its ``group_id`` column), joined with an optional column such as ``patient_id``, lies in one
fold only, so no image is scored by a model that trained on its copy. Each fold is an index selection of the
one stored dataset (:mod:`derm_accel.data.selection`; no image is copied): ``train`` and ``validation`` (a
grouped, stratified tenth of the training folds, for picking the best epoch) from the other folds, ``test`` the
held-out fold. Datasets converted before ``group_id`` existed get their groups recomputed from the stored images.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm_accel.core.errors import InputError
from derm_accel.data.decode import near_copy_signature
from derm_accel.data.dedupe import group_images
from derm_accel.data.near_copies import Signatures
from derm_accel.data.schema import GROUP_COLUMN
from derm_accel.data.selection import DATASET_DICT_FILE, is_converted, source_layout, write_selection
from derm_accel.data.split import stratified_group_split
from derm_accel.data.transforms import decode_image

SPLITS = ("train", "validation", "test")
DEFAULT_NEAR_THRESHOLD = 4  # convert's default
INNER_VAL_FRAC = 0.1

logger = logging.getLogger(__name__)


def column(rows: Any, name: str) -> np.ndarray:
    """One column of a ``Dataset`` as a numpy array, through Arrow (``np.asarray(rows[name])`` walks the rows
    one by one in Python: seconds at 245k rows)."""
    return rows.with_format("arrow")[name].to_numpy()


def _pooled(data: str | Path) -> tuple[Any, Any, np.ndarray]:
    """The converted DatasetDict, its splits laid end to end (no copy), and the order that sorts them by path."""
    from datasets import concatenate_datasets, load_from_disk

    if not (Path(data) / DATASET_DICT_FILE).exists():
        raise FileNotFoundError(f"{data} is not a dataset written by `derm-accel convert` (no {DATASET_DICT_FILE})")
    dataset = load_from_disk(str(data))
    pooled = concatenate_datasets([dataset[s] for s in dataset])
    return dataset, pooled, np.argsort(column(pooled, "source_path"), kind="stable")


def pooled_rows(data: str | Path) -> Any:
    """Every row of every split of a converted dataset, as one ``Dataset`` sorted by ``source_path``.

    Sorting makes the fold assignment independent of how convert split the rows, so two conversions of the
    same folders (e.g. at two image sizes) get the same folds.
    """
    _, pooled, order = _pooled(data)
    return pooled.select(order)


def near_threshold(data: str | Path) -> int:
    """The near-duplicate threshold the dataset was converted with (its conversion report), else convert's."""
    report = Path(data) / "conversion_report.json"
    if report.is_file():
        return int(json.loads(report.read_text()).get("parameters", {}).get("near_threshold", DEFAULT_NEAR_THRESHOLD))
    return DEFAULT_NEAR_THRESHOLD


def first_member_ids(labels: np.ndarray) -> np.ndarray:
    """Group ids renumbered 0, 1, ... in the order of each group's first row, so one partition always gets
    the same ids (and so the same folds) whatever numbers it came with."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def joined_groups(groups: np.ndarray, keys: Sequence[Any] | None = None) -> np.ndarray:
    """``groups`` joined with ``keys`` (rows sharing a non-empty key join one group, with all their groups):
    connected components over rows, O(n); ids as :func:`first_member_ids` gives them."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    groups = np.asarray(groups)
    if keys is None:
        return first_member_ids(groups)
    n = len(groups)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    src, dst = [np.arange(n)], [first[inverse.reshape(-1)]]
    keys = np.asarray(keys, dtype=object)
    valid = np.flatnonzero([k is not None and k != "" for k in keys])
    if len(valid):
        _, first_key, key_inverse = np.unique(keys[valid].astype(str), return_index=True, return_inverse=True)
        src.append(valid)
        dst.append(valid[first_key[key_inverse.reshape(-1)]])
    rows, cols = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, components = connected_components(graph, directed=False)
    return first_member_ids(components)


def recomputed_groups(rows: Any, threshold: int = DEFAULT_NEAR_THRESHOLD) -> np.ndarray:
    """Convert's duplicate grouping redone from the stored images (for datasets without ``group_id``): the same
    function convert groups with (``dedupe.group_images``: exact copies share ``content_hash``, near copies are
    pHash candidates whose detail hashes agree, verified on their thumbnails), the signatures computed from the
    stored images as convert computes them from the originals and kept in a temporary file-backed array. Decodes
    every image (about 1 ms each)."""
    from datasets import Image as ImageFeature

    images = rows.cast_column("image", ImageFeature(decode=False))["image"]
    with tempfile.TemporaryDirectory(prefix="derm-accel-folds-") as folder:
        signatures = Signatures.allocate(len(rows), Path(folder))
        for i, cell in enumerate(images):
            signatures.put(i, near_copy_signature(decode_image(cell)))
        groups = group_images(list(column(rows, "content_hash")), signatures, threshold).groups
        del signatures
    ids = np.empty(len(rows), dtype=np.int64)
    for gid, members in enumerate(groups):
        ids[members] = gid
    return ids


def duplicate_groups(rows: Any, threshold: int = DEFAULT_NEAR_THRESHOLD, group_column: str | None = None) -> np.ndarray:
    """A group id per row: convert's grouping (the ``group_id`` column), joined with ``group_column`` (e.g.
    patient) if given. A dataset converted before convert stored ``group_id`` has its groups recomputed from
    its images (:func:`recomputed_groups`), with a warning that says so."""
    if group_column is not None and group_column not in rows.column_names:
        raise ValueError(
            f"group column '{group_column}' is not in the dataset (columns: {', '.join(rows.column_names)})"
        )
    if GROUP_COLUMN in rows.column_names:
        groups = column(rows, GROUP_COLUMN)
    else:
        logger.warning(
            "This dataset has no '%s' column (converted by an earlier derm-accel): recomputing its duplicate "
            "groups from the stored images (%d images, about 1 ms each). Convert it again to skip this.",
            GROUP_COLUMN,
            len(rows),
        )
        groups = recomputed_groups(rows, threshold)
    keys = rows.with_format("arrow")[group_column].to_pylist() if group_column else None
    return joined_groups(groups, keys)


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
    chosen = (r for g, s in zip(keys, splits, strict=True) if s == "validation" for r in member_groups[g])
    return np.array(sorted(chosen), dtype=np.int64)


def fold_parts(labels: np.ndarray, fold_of: np.ndarray, groups: np.ndarray, fold: int, seed: int = 0) -> dict:
    """The rows of fold ``fold``'s splits: train/validation from the other folds, test the held-out fold."""
    rest = np.flatnonzero(fold_of != fold)
    val = inner_validation(labels, groups, rest, seed + fold)
    return {"train": np.setdiff1d(rest, val), "validation": val, "test": np.flatnonzero(fold_of == fold)}


def write_fold(
    labels: np.ndarray, fold_of: np.ndarray, groups: np.ndarray, fold: int, out: str | Path, *,
    base: np.ndarray, layout: dict[str, Any], seed: int = 0,
) -> Path:
    """Fold ``fold`` as an index selection at ``out`` (``base[i]``: row ``i``'s index in the source's splits
    laid end to end; ``layout``: :func:`selection.source_layout`). An older fold folder there is replaced."""
    parts = fold_parts(labels, fold_of, groups, fold, seed)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)  # also a full copy written by an earlier derm-accel
    write_selection(out, layout, {s: base[parts[s]] for s in SPLITS})
    return out


def drop_holdout(held: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, int]:
    """The rows to keep outside a held-out split (mask ``held``): not held out, and in no group with a held-out
    row (else a copy of a held-out image, or the same patient, would train the models judged on it); and the
    number of rows dropped as such copies."""
    keep = ~held & ~np.isin(groups, np.unique(groups[held]))
    return keep, int((~held & ~keep).sum())


def _check_holdout(dataset: Any, data: str | Path, holdout: str) -> None:
    if holdout not in dataset:
        raise InputError(f"{data} has no '{holdout}' split to hold out (it has {sorted(dataset)}); fix --holdout.")


def without_holdout(rows: Any, groups: np.ndarray, data: str | Path, holdout: str) -> tuple[Any, np.ndarray, int]:
    """The rows outside the ``holdout`` split, less those that share a duplicate or patient group with a held-out
    row (see :func:`drop_holdout`)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(data))
    _check_holdout(dataset, data, holdout)
    held = np.isin(column(rows, "source_path"), column(dataset[holdout], "source_path"))
    keep, dropped = drop_holdout(held, groups)
    return rows.select(np.flatnonzero(keep)), groups[keep], dropped


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
    """``out_dir/fold_1 .. fold_K``: one index selection of ``data`` per fold (reused when the assignment is
    unchanged); ``out_dir/folds.json`` records the assignment (each row's path, fold and group).

    ``trained`` lists fold runs that already exist: a changed assignment is then refused, since their models
    may have trained on images that the new folds hold out. ``holdout`` names a split kept out of every fold.
    """
    out_dir = Path(out_dir)
    dataset, pooled, base = _pooled(data)
    rows = pooled.select(base)  # the holdout too: duplicate and patient groups are found across all splits
    groups = duplicate_groups(rows, near_threshold(data), group_column)
    near_holdout = 0
    if holdout:
        _check_holdout(dataset, data, holdout)
        start = sum(len(dataset[s]) for s in list(dataset)[: list(dataset).index(holdout)])
        keep, near_holdout = drop_holdout((base >= start) & (base < start + len(dataset[holdout])), groups)
        base, groups = base[keep], groups[keep]
    labels = column(pooled, "label")[base]
    fold_of = assign_folds(labels, groups, folds, seed)
    assignment = {
        "data": str(Path(data).resolve()),
        "folds": folds,
        "seed": seed,
        "group_column": group_column,
        # absent when unset: earlier manifests stay valid
        **({"holdout": holdout, "dropped_as_copies_of_holdout": near_holdout} if holdout else {}),
        "source_paths": column(pooled, "source_path")[base].tolist(),
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
    layout = source_layout(dataset, data)
    paths = []
    for k in range(folds):
        path = out_dir / f"fold_{k + 1}"
        if fresh or not is_converted(path):  # an unchanged fold kept as it is (also an earlier full copy)
            write_fold(labels, fold_of, groups, k, path, base=base, layout=layout, seed=seed)
        paths.append(path)
    manifest.write_text(json.dumps(assignment) + "\n")
    return paths
