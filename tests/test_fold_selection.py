"""k-fold folds read convert's stored groups and are index selections of the one dataset (no copies)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

from derm_accel.data import folds as folds_module
from derm_accel.data.folds import (
    duplicate_groups,
    first_member_ids,
    joined_groups,
    make_fold_datasets,
    pooled_rows,
)
from derm_accel.data.schema import GROUP_COLUMN
from derm_accel.data.selection import SELECTION_FILE, SelectionError, is_converted, load_converted
from tests.train_utils import make_dataset


def _regroup(src: Path, out: Path, group_of) -> Path:
    """``src`` saved again at ``out`` with ``group_of(source_path)`` as each row's group_id."""
    data = load_from_disk(str(src))
    regrouped = {}
    for split, ds in data.items():
        ids = [group_of(p) for p in ds["source_path"]]
        regrouped[split] = ds.remove_columns(GROUP_COLUMN).add_column(GROUP_COLUMN, ids)
    DatasetDict(regrouped).save_to_disk(str(out))
    return out


def test_group_ids_are_renumbered_by_first_member_and_joined_with_keys() -> None:
    assert first_member_ids(np.array([9, 3, 9, 1])).tolist() == [0, 1, 0, 2]
    groups = np.array([5, 5, 7, 8, 9, 10])
    keys = ["a", None, "a", "", "b", "b"]  # empty cells join nothing
    assert joined_groups(groups, keys).tolist() == [0, 0, 0, 1, 2, 2]
    assert joined_groups(groups).tolist() == [0, 0, 1, 2, 3, 4]
    chain = joined_groups(np.array([0, 1, 1, 2]), ["x", "y", None, "y"])  # 0-1 by nothing, 1-3 by y
    assert chain.tolist() == [0, 1, 1, 1]


def test_folds_are_index_selections_built_from_stored_groups(tmp_path: Path, monkeypatch) -> None:
    base = make_dataset(tmp_path / "base", size=16)  # 72 rows, 3 classes
    # Pairs of rows form one group (as convert stores near copies), whatever split they are in.
    data = _regroup(base, tmp_path / "data", lambda p: (int(p.rsplit("_", 1)[1][:5]) - 1) // 2)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the stored group_id column must be read, not recomputed from images")

    monkeypatch.setattr(folds_module, "recomputed_groups", no_decoding)
    monkeypatch.setattr(folds_module, "decode_image", no_decoding)
    paths = make_fold_datasets(data, tmp_path / "folds", 3, seed=0)

    assert not list((tmp_path / "folds").rglob("*.arrow"))  # no image copied
    assert sorted(p.name for p in (tmp_path / "folds" / "fold_1").iterdir()) == [SELECTION_FILE]
    source = {r["source_path"]: r for split in load_from_disk(str(data)).values() for r in split}
    held_out: list[str] = []
    for path in paths:
        assert is_converted(path)
        fold = load_converted(path)
        parts = {s: list(fold[s]["source_path"]) for s in ("train", "validation", "test")}
        assert sum(map(len, parts.values())) == 72 and len(set().union(*map(set, parts.values()))) == 72
        held_out += parts["test"]
        group_split = {}
        for split in parts:
            for row in fold[split]:  # the selected rows are the source's rows, image bytes included
                original = source[row["source_path"]]
                assert row["content_hash"] == original["content_hash"] and row["label"] == original["label"]
                assert group_split.setdefault(row[GROUP_COLUMN], split) == split  # a group stays in one split
    assert sorted(held_out) == sorted(source)  # every row held out by exactly one fold

    manifest = json.loads((tmp_path / "folds" / "folds.json").read_text())
    by_group: dict[int, set[int]] = {}
    for group, fold in zip(manifest["group"], manifest["fold"], strict=True):
        by_group.setdefault(group, set()).add(fold)
    assert len(by_group) == 36 and all(len(f) == 1 for f in by_group.values())

    # A second run with the same assignment keeps the selections (k-fold runs resume on them).
    stamp = (paths[0] / SELECTION_FILE).stat().st_mtime_ns
    assert make_fold_datasets(data, tmp_path / "folds", 3, seed=0) == paths
    assert (paths[0] / SELECTION_FILE).stat().st_mtime_ns == stamp


def test_a_selection_refuses_a_changed_source(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", size=16)
    fold = make_fold_datasets(data, tmp_path / "folds", 2)[0]
    assert len(load_converted(fold)["test"]) > 0
    original = load_from_disk(str(data))
    train = original["train"].select(range(len(original["train"]) - 1))  # one row fewer
    DatasetDict({"train": train, "validation": original["validation"], "test": original["test"]}).save_to_disk(
        str(tmp_path / "data2")
    )
    manifest = json.loads((fold / SELECTION_FILE).read_text())
    manifest["data"] = str(tmp_path / "data2")
    (fold / SELECTION_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SelectionError, match="changed since"):
        load_converted(fold)
    manifest["data"] = str(tmp_path / "gone")
    (fold / SELECTION_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SelectionError, match="not there any more"):
        load_converted(fold)
    with pytest.raises(FileNotFoundError, match=r"no dataset_dict\.json"):
        load_converted(tmp_path)


def test_a_dataset_without_group_ids_is_regrouped_from_its_images_with_a_warning(tmp_path: Path, caplog) -> None:
    data = load_from_disk(str(make_dataset(tmp_path / "data", size=16)))
    train = data["train"]
    twin = Dataset.from_dict({**train[:1], "source_path": ["copies/twin.jpg"]}, features=train.features)
    old = DatasetDict(
        {s: (concatenate_datasets([ds, twin]) if s == "train" else ds).remove_columns(GROUP_COLUMN) for s, ds in
         data.items()}
    )
    old.save_to_disk(str(tmp_path / "old"))
    rows = pooled_rows(tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="derm_accel.data.folds"):
        groups = duplicate_groups(rows)
    assert "no 'group_id' column" in caplog.text and "recomputing" in caplog.text
    paths = list(rows["source_path"])
    twin_at, first_at = paths.index("copies/twin.jpg"), paths.index(train[0]["source_path"])
    assert groups[twin_at] == groups[first_at]  # the exact copy joins its original
    assert len(np.unique(groups)) == len(rows) - 1
    # With the column, the same partition comes back with the same ids (so earlier fold runs still match).
    stored = rows.add_column(GROUP_COLUMN, (1000 - groups).tolist())  # other numbers, same partition
    caplog.clear()
    assert np.array_equal(duplicate_groups(stored), groups) and "recomputing" not in caplog.text
