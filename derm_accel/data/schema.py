"""The dataset schema that `convert` writes and every later stage reads."""

from __future__ import annotations

from datasets import ClassLabel, Features, Value
from datasets import Image as ImageFeature

SPLITS = ("train", "validation", "test")
GROUP_COLUMN = "group_id"  # the row's unit: its exact/near copies and its patient/lesion (one split, one fold)


def dataset_features(class_names: list[str], *, with_group: bool = True) -> Features:
    """Image bytes, the ClassLabel, and the provenance columns a reviewer needs to trace a row to its file.

    ``group_id`` (int64) numbers the unit each row belongs to: rows with the same id are copies or near copies
    of one image, or share a patient/lesion, and convert keeps them in one split (k-fold: one fold). It is known
    only once every file is decoded, so convert's staging pass writes the other columns (``with_group=False``).
    """
    columns = {
        "image": ImageFeature(),
        "label": ClassLabel(names=class_names),
        "source_path": Value("string"),
        "orig_width": Value("int32"),
        "orig_height": Value("int32"),
        "content_hash": Value("string"),
        "phash": Value("string"),
    }
    if with_group:
        columns[GROUP_COLUMN] = Value("int64")
    return Features(columns)
