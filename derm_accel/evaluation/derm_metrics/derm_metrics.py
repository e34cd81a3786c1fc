"""derm_metrics: the metrics a skin-disease classifier is judged on, computed in one pass.

An ``evaluate`` metric module, so that the numbers in a model card come from a script anyone can load:
``evaluate.load("path/to/derm_metrics")`` (or from the Hub once published). Classes without reference samples
are excluded from macro averages and from AUCs instead of silently counting as zeros.
"""

from __future__ import annotations

import warnings

import datasets
import evaluate
import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

_CITATION = """\
@article{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  journal={ICML},
  year={2017}
}
"""

_DESCRIPTION = """\
Multi-class classification metrics for medical image classifiers: accuracy, balanced accuracy, top-3 accuracy,
macro/weighted precision, recall and F1 over the classes present in the references, per-class precision,
recall, F1, support, one-vs-rest ROC-AUC and PR-AUC, macro and micro ROC-AUC, the confusion matrix,
negative log-likelihood,
expected calibration error, and seeded percentile-bootstrap 95% intervals for accuracy and macro-F1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class index per sample (normally the argmax of `probabilities`).
    probabilities (`list` of `list` of `float`): class probabilities per sample (rows sum to 1).
    references (`list` of `int`): true class index per sample.
    label_names (`list` of `str`, optional): class names; default "0".."C-1". Sets the number of classes.
    ece_bins (`int`, default 15): equal-width confidence bins for the expected calibration error.
    bootstrap (`int`, default 1000): bootstrap resamples for the 95% intervals (0 disables them).
    seed (`int`, default 0): seed of the bootstrap (`numpy.random.default_rng(seed)`).
Returns:
    accuracy, balanced_accuracy, top3_accuracy, macro_/weighted_ precision, recall, f1, roc_auc_macro,
    roc_auc_micro, nll, ece, ci95 {"accuracy": [lo, hi], "macro_f1": [lo, hi]}, per_class {name: {precision,
    recall, f1, support, roc_auc, pr_auc}}, confusion_matrix (rows = true class), classes_without_samples,
    num_samples. Undefined values (e.g. the recall of a class without samples) are `None`.
Examples:
    >>> metric = evaluate.load("derm_accel/evaluation/derm_metrics")
    >>> out = metric.compute(predictions=[0, 1], probabilities=[[0.8, 0.2], [0.3, 0.7]], references=[0, 1])
    >>> out["accuracy"]
    1.0
"""

# Resamples are drawn in chunks so that memory stays bounded on large test splits (same stream as one draw).
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def top_k_accuracy(references: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the k most probable (ties broken as scikit-learn does)."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(probabilities, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float((order == references[:, None]).any(axis=1).mean())


def expected_calibration_error(
    references: np.ndarray, probabilities: np.ndarray, n_bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width bins of the top-class confidence, and the bins (for a reliability diagram)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == references
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 joins the first bin.
    bin_index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    bins = []
    for i in range(n_bins):
        mask = bin_index == i
        count = int(mask.sum())
        if count:
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += abs(acc - conf) * count / len(references)
        else:
            acc, conf = float("nan"), float("nan")
        bins.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": count,
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return float(ece), bins


def bootstrap_intervals(
    references: np.ndarray, predictions: np.ndarray, num_classes: int, n_resamples: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile 95% intervals of accuracy and macro-F1 (classes present in each resample), vectorised."""
    n = len(references)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // max(n, 1))
    accuracies, macro_f1s = [], []
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        y, p = references[idx], predictions[idx]
        offset = np.arange(b)[:, None] * num_classes
        size = b * num_classes
        hit = y == p
        tp = np.bincount((offset + y)[hit], minlength=size).reshape(b, num_classes)
        true_count = np.bincount((offset + y).ravel(), minlength=size).reshape(b, num_classes)
        pred_count = np.bincount((offset + p).ravel(), minlength=size).reshape(b, num_classes)
        denom = true_count + pred_count
        f1 = np.divide(2 * tp, denom, out=np.zeros((b, num_classes)), where=denom > 0)
        present = true_count > 0
        macro_f1s.append((f1 * present).sum(axis=1) / present.sum(axis=1))
        accuracies.append(hit.mean(axis=1))
        done += b
    acc = np.concatenate(accuracies)
    mf1 = np.concatenate(macro_f1s)
    return {
        "accuracy": [float(v) for v in np.percentile(acc, [2.5, 97.5])],
        "macro_f1": [float(v) for v in np.percentile(mf1, [2.5, 97.5])],
    }


def _none_if_nan(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def _checked_inputs(predictions, probabilities, references, label_names):
    y = np.asarray(references, dtype=np.int64)
    y_pred = np.asarray(predictions, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y) or len(y_pred) != len(y):
        raise ValueError("probabilities must be an (N, C) array with one row per reference and prediction")
    num_classes = probs.shape[1]
    names = [str(n) for n in label_names] if label_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label_names for probabilities with {num_classes} columns")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    for arr, what in ((y, "references"), (y_pred, "predictions")):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"{what} must be class indices in [0, {num_classes})")
    return y, y_pred, probs, names


def _rank_auc(ranks: np.ndarray, positives: np.ndarray) -> float:
    """ROC-AUC from tie-averaged ranks (Mann-Whitney U): the area under the trapezoidal ROC curve."""
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(positives: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as scikit-learn's ``average_precision_score``: the precision at each distinct score,
    weighted by the recall it adds (one sort, no interpolation)."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    tps = np.cumsum(positives[order])
    ends = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1]  # last row of each tie
    tp = tps[ends]
    return float(np.sum(np.diff(tp, prepend=0) / tp[-1] * tp / (ends + 1)))


def micro_roc_auc(references: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC-AUC of all (sample, class) scores at once, each true class a positive: per class, the negatives'
    scores sorted once and every positive placed among them (ties count one half). O(C N log N) time, O(N)
    memory, where ranking the N C scores together would hold several (N, C) arrays."""
    positives = probabilities[np.arange(len(references)), references]
    below = 0.0
    for c in range(probabilities.shape[1]):
        negatives = np.sort(probabilities[references != c, c])
        lower = np.searchsorted(negatives, positives, side="left")
        upper = np.searchsorted(negatives, positives, side="right")
        below += float(lower.sum()) + 0.5 * float((upper - lower).sum())
    return below / (len(positives) * (probabilities.size - len(positives)))


def ranking_scores(references: np.ndarray, probabilities: np.ndarray, present: np.ndarray):
    """One-vs-rest ROC-AUC and PR-AUC per class (NaN where undefined) and the micro ROC-AUC: sorts of one
    column at a time, so time O(C N log N) and memory O(N) beyond the inputs."""
    num_classes = probabilities.shape[1]
    roc_auc = np.full(num_classes, np.nan)
    pr_auc = np.full(num_classes, np.nan)
    for c in present:
        positives = references == c
        pr_auc[c] = average_precision(positives, probabilities[:, c])
        if not positives.all():
            roc_auc[c] = _rank_auc(rankdata(probabilities[:, c]), positives)
    micro = micro_roc_auc(references, probabilities) if len(present) > 1 else None
    return roc_auc, pr_auc, micro


def _per_class(names, support, predicted_count, prec, rec, f1, roc_auc, pr_auc):
    per_class = {}
    for c, name in enumerate(names):
        has_samples = support[c] > 0
        per_class[name] = {
            "precision": float(prec[c]) if predicted_count[c] > 0 or has_samples else None,
            "recall": float(rec[c]) if has_samples else None,
            "f1": float(f1[c]) if has_samples else None,
            "support": int(support[c]),
            "roc_auc": _none_if_nan(roc_auc[c]),
            "pr_auc": _none_if_nan(pr_auc[c]),
        }
    return per_class


def compute_metrics(
    predictions, probabilities, references, label_names=None, ece_bins: int = 15, bootstrap: int = 1000, seed: int = 0
) -> dict:
    """Every number of the module from arrays (what ``DermMetrics.compute`` returns, without its Arrow round
    trip): time O(C N log N + N * bootstrap), memory a few (N, C) arrays."""
    y, y_pred, probs, names = _checked_inputs(predictions, probabilities, references, label_names)
    num_classes = probs.shape[1]
    all_labels = np.arange(num_classes)
    support = np.bincount(y, minlength=num_classes)
    present = all_labels[support > 0]

    # Macro averages over the classes present in the references: an absent class has no recall to average.
    macro = precision_recall_fscore_support(y, y_pred, labels=present, average="macro", zero_division=0)
    weighted = precision_recall_fscore_support(y, y_pred, labels=present, average="weighted", zero_division=0)
    prec, rec, f1, _ = precision_recall_fscore_support(y, y_pred, labels=all_labels, average=None, zero_division=0)
    # One-vs-rest AUCs need positives and negatives; classes without them get None and are skipped.
    roc_auc, pr_auc, roc_auc_micro = ranking_scores(y, probs, present)
    valid_auc = roc_auc[~np.isnan(roc_auc)]
    true_prob = np.clip(probs[np.arange(len(y)), y] / probs.sum(axis=1), np.finfo(np.float64).eps, 1.0)
    with warnings.catch_warnings():
        # Predictions of an absent class are ignored by design (they still count as errors in accuracy).
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced_accuracy = float(balanced_accuracy_score(y, y_pred))
    return {
        "num_samples": len(y),
        "accuracy": float((y == y_pred).mean()),
        "balanced_accuracy": balanced_accuracy,
        "top3_accuracy": top_k_accuracy(y, probs, 3),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "weighted_precision": float(weighted[0]),
        "weighted_recall": float(weighted[1]),
        "weighted_f1": float(weighted[2]),
        "roc_auc_macro": float(valid_auc.mean()) if len(valid_auc) else None,
        "roc_auc_micro": roc_auc_micro,
        "nll": float(-np.log(true_prob).mean()),
        "ece": expected_calibration_error(y, probs, ece_bins)[0],
        "ci95": bootstrap_intervals(y, y_pred, num_classes, bootstrap, seed) if bootstrap > 0 else None,
        "per_class": _per_class(
            names, support, np.bincount(y_pred, minlength=num_classes), prec, rec, f1, roc_auc, pr_auc
        ),
        "confusion_matrix": confusion_matrix(y, y_pred, labels=all_labels).tolist(),
        "classes_without_samples": [names[c] for c in all_labels[support == 0]],
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DermMetrics(evaluate.Metric):
    """Classification, ranking and calibration metrics in one module; absent classes handled explicitly."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "probabilities": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/model_evaluation.html",
                "https://arxiv.org/abs/1706.04599",
            ],
        )

    def _compute(
        self,
        predictions,
        probabilities,
        references,
        label_names=None,
        ece_bins: int = 15,
        bootstrap: int = 1000,
        seed: int = 0,
    ):
        return compute_metrics(predictions, probabilities, references, label_names, ece_bins, bootstrap, seed)
