"""The dataset schema that `convert` writes and every later stage reads."""

from __future__ import annotations

from datasets import ClassLabel, Features, Value
from datasets import Image as ImageFeature

SPLITS = ("train", "validation", "test")


def dataset_features(class_names: list[str]) -> Features:
    """Image bytes, the ClassLabel, and the provenance columns a reviewer needs to trace a row to its file."""
    return Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=class_names),
            "source_path": Value("string"),
            "orig_width": Value("int32"),
            "orig_height": Value("int32"),
            "content_hash": Value("string"),
            "phash": Value("string"),
        }
    )
