"""The files the stages hand each other, with their field names in one place, and how their numbers read.

convert -> ``conversion_report.json`` (beside the dataset) -> train -> ``RUN/best``: ``training_info.json``,
``val_metrics.json``, ``recipe.yaml`` -> evaluate -> ``REPORT/metrics.json`` -> push (model card). The
TypedDicts below name the fields that a later stage reads; a file may hold more (they are for people).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, TypedDict

# File names.
CONVERSION_REPORT = "conversion_report.json"  # convert: every file as a row or a skip with its reason
RUN_INFO = "run_info.json"  # train, RUN/: versions, git commit, hardware
RECIPE = "recipe.yaml"  # train, RUN/ and RUN/best: the resolved recipe
TRAINING_INFO = "training_info.json"  # train, RUN/best: how the exported model was trained
VAL_METRICS = "val_metrics.json"  # train, RUN/best: validation metrics of the exported epoch
METRICS = "metrics.json"  # evaluate, REPORT/: the contract with the model card


class ConversionReport(TypedDict, total=False):
    format_version: int
    status: str  # "failed" when no usable dataset was written
    error: str
    src: str
    layout: str
    files_total: int
    rows_total: int
    skipped_total: int
    skipped_by_reason: dict[str, int]
    skipped: list[dict[str, Any]]
    class_names: list[str]
    splits: dict[str, Any]
    duplicates: dict[str, Any]
    license: str | None
    push_to_hub: str | None


class ValMetrics(TypedDict):
    split: str
    epoch: int
    loss: float
    accuracy: float
    macro_f1: float
    num_samples: int


class TrainingInfo(TypedDict, total=False):
    epochs_run: int
    epochs_planned: int
    best_epoch: int | None
    best_val_macro_f1: float
    global_steps: int
    model: str
    input_size: list[int]
    base_model: dict[str, Any] | None  # the pretrained weights training started from
    dataset: dict[str, Any] | None  # the dataset's provenance (Hub id, license) from its conversion report
    ema: bool
    mixed_precision: str
    num_processes: int
    distributed_type: str
    device_name: str
    train_images_per_s: float
    wall_time_s: float
    dataset_path: str
    dataset_class_names: list[str]
    recipe_changes: list[dict[str, Any]]  # recipe keys changed on a resume, with the step
    license: str | None
    derm_accel_version: str
    stopped_early: bool  # written when training ends


class ClassMetrics(TypedDict):
    precision: float | None
    recall: float | None
    f1: float | None
    support: int
    roc_auc: float | None
    pr_auc: float | None


class Metrics(TypedDict, total=False):
    """``metrics.json``: None where a metric is undefined (e.g. ROC-AUC with one class present)."""

    model: str
    data: str
    split: str
    label_names: list[str]
    num_samples: int
    accuracy: float
    balanced_accuracy: float
    top3_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    roc_auc_macro: float | None
    roc_auc_micro: float | None
    nll: float
    ece: float
    ci95: dict[str, list[float]] | None  # bootstrap intervals of accuracy and macro_f1
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    classes_without_samples: list[str]
    tta: dict[str, Any] | None
    calibration: dict[str, Any] | None
    subgroups: dict[str, Any] | None
    external_validation: dict[str, Any] | None
    out_of_domain: dict[str, Any] | None


# How each metric of metrics.json is named for people: the evaluation report and the model card.
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "top3_accuracy": "Top-3 accuracy",
    "macro_precision": "Macro precision",
    "macro_recall": "Macro recall",
    "macro_f1": "Macro F1",
    "weighted_precision": "Weighted precision",
    "weighted_recall": "Weighted recall",
    "weighted_f1": "Weighted F1",
    "roc_auc_macro": "ROC AUC (macro, one-vs-rest)",
    "roc_auc_micro": "ROC AUC (micro)",
    "nll": "Negative log-likelihood",
    "ece": "Expected calibration error",
}


def number(value: Any) -> float | None:
    """``value`` as a float if it is a finite-or-infinite real number (bools excluded), else None; NaN is None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def fmt(value: Any, digits: int = 3) -> str:
    """A value for a table: integers as they are, real numbers to ``digits`` decimals, undefined values
    (None, NaN) as ``n/a`` rather than 0, anything else as text."""
    if value is None:
        return "n/a"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    real = number(value)
    if real is not None:
        return f"{real:.{digits}f}"
    return "n/a" if isinstance(value, numbers.Real) and not isinstance(value, bool) else str(value)


def pct(value: Any, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage; undefined values as ``n/a``."""
    real = number(value)
    return "n/a" if real is None else f"{100 * real:.{digits}f}%"


CONFIG_NAME = "config.json"


WEIGHTS_NAME = "model.safetensors"


ENSEMBLE_FILE = "ensemble.json"


FOLD_DATA = "fold_data"


TRAINING_ROWS = "training_rows.json"  # train, RUN/best: the ids of the images the model trained on
