"""Which images a model trained on, carried beside it, so that no model is scored on its own training images.

``train`` writes ``RUN/best/training_rows.json``: the id of every row of its training split, the first 16 hex
digits of the row's ``content_hash`` (convert's hash of the decoded pixels, so a copy of an image in another
split, another conversion or another collection has the same id). A soup's file is the union of its members'.
``evaluate`` reads it for every model it is given (one model, several ``--model``, the members of an ensemble
folder) and refuses one that trained on any image of the evaluated split, naming it. The file stays in the
run folder: it is not published with the model (it would tell anyone holding an image whether it trained it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from derm_accel.core.artifacts import TRAINING_ROWS
from derm_accel.core.errors import InputError
from derm_accel.core.fileio import atomic_write_json
from derm_accel.core.paths import shareable_path

FORMAT = 1
ID_DIGITS = 16
HASH_COLUMN = "content_hash"


class TrainedOnEvaluatedImagesError(InputError):
    """A model is asked to be scored on images it was trained on: its scores would be optimistic."""


def row_ids(split: Any) -> list[str]:
    """The sorted, distinct ids of a dataset split's rows (empty when it has no ``content_hash`` column)."""
    if HASH_COLUMN not in split.column_names:
        return []
    return sorted({h[:ID_DIGITS] for h in split[HASH_COLUMN] if h})


def training_rows(ids: Iterable[str], data: str | os.PathLike, split: str) -> dict[str, Any]:
    """The content of ``training_rows.json`` for a model trained on ``data[split]``."""
    ids = sorted(set(ids))
    return {
        "format": FORMAT,
        "id": f"{HASH_COLUMN}[:{ID_DIGITS}]",
        "dataset": shareable_path(data) if Path(data).exists() else str(data),
        "split": split,
        "count": len(ids),
        "ids": ids,
    }


def read_training_rows(model_dir: str | os.PathLike) -> set[str] | None:
    """The ids a model folder trained on; None when it records none (a Hub model, or one trained elsewhere)."""
    path = Path(os.fspath(model_dir).removeprefix("local-dir:")) / TRAINING_ROWS
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
        return {str(i) for i in spec["ids"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{path} is not a readable list of training rows ({exc}); it is written by `derm-accel train`: "
            "restore it from the run, or delete it to score the model unchecked."
        ) from exc


def write_merged_training_rows(member_dirs: Sequence[Path], out: Path) -> None:
    """``out/training_rows.json``: every image any member trained on (a soup learnt from all of them)."""
    merged: set[str] = set()
    for d in member_dirs:
        ids = read_training_rows(d)
        if ids is None:
            return  # one member's training images are unknown: so are the soup's
        merged |= ids
    atomic_write_json(out / TRAINING_ROWS, training_rows(merged, "the members' training data", "train"))


def refuse_trained_on(
    models: Sequence[tuple[str, str]], split: Any, data: str | os.PathLike, split_name: str
) -> None:
    """Refuse when any of ``models`` ((name shown, local folder)) trained on an image of ``data[split_name]``."""
    wanted = set(row_ids(split))
    if not wanted:
        return
    for name, folder in models:
        trained = read_training_rows(folder)
        if not trained:
            continue
        seen = len(wanted & trained)
        if seen:
            raise TrainedOnEvaluatedImagesError(
                f"{name} was trained on {seen} of the {len(wanted)} images of the '{split_name}' split of {data} "
                f"(its {TRAINING_ROWS} lists the content hash of every training image), so its scores there would "
                f"be optimistic. Evaluate it on a split it never trained on (a fold model: its own fold's test "
                f"split, or the split held out with train --folds K --holdout SPLIT), on another dataset, or read "
                f"the out-of-fold scores in the run's oof_predictions.csv."
            )
