"""Statistics of cross-validation: mean, sd and t-intervals over folds, paired differences, and the
per-fold classification metrics they summarise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def t_quantile(df: int, level: float = 0.95) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_sd_ci(values: list[float] | np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Mean, sample sd and the t-interval of the mean over folds."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile(n - 1, level) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "values": x.tolist()}


def paired_difference(values: list[float], baseline: list[float], level: float = 0.95) -> dict[str, Any]:
    """``values - baseline`` fold by fold: mean, sd and t-interval of the paired differences."""
    if len(values) != len(baseline):
        raise ValueError(f"paired difference needs the same folds: {len(values)} vs {len(baseline)} values")
    return mean_sd_ci(np.asarray(values) - np.asarray(baseline), level)


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """The toolkit's one macro-F1: the mean F1 over the classes present in ``labels``, as evaluate reports it
    (a class without images has no recall, so it is left out rather than counted as 0). Training's best epoch,
    the k-fold report, ensemble members and subgroups all use it."""
    from sklearn.metrics import f1_score

    labels = np.asarray(labels)
    return float(f1_score(labels, np.asarray(predicted), labels=np.unique(labels), average="macro", zero_division=0))


def classification_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Macro-F1 (:func:`macro_f1`, over the classes present), balanced accuracy and accuracy."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # a prediction of an absent class still counts as an error in accuracy
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(labels, predicted))
    return {
        "macro_f1": macro_f1(labels, predicted),
        "balanced_accuracy": balanced,
        "accuracy": float((np.asarray(labels) == np.asarray(predicted)).mean()),
    }
