"""Figures of the evaluation report, drawn with matplotlib's Agg canvas.

Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global backend switch), so
plotting works on headless nodes and never interferes with a notebook's backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from derm_accel.evaluation.calibration import expected_calibration_error
from derm_accel.guard.fit import risk_coverage


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_confusion_matrix(
    matrix: np.ndarray | Sequence[Sequence[int]], label_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """Row-normalised colours (recall on the diagonal) with raw counts written in each cell."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(label_names)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = max(4.0, 0.45 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    font = max(4, min(9, int(120 / max(n, 1))))
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                colour = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font, color=colour)
    ticks = [f"{name} (no samples)" if rows[i, 0] == 0 else name for i, name in enumerate(label_names)]
    ax.set_xticks(range(n), labels=list(label_names), rotation=90, fontsize=font + 1)
    ax.set_yticks(range(n), labels=ticks, fontsize=font + 1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (colour: row-normalised, numbers: counts)")
    return _save(fig, path)


def plot_roc_curves(
    labels: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """One-vs-rest ROC curve per class that has positives and negatives, plus the micro average; the legend
    gives each curve's AUC."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    drawn = 0
    for c, name in enumerate(label_names):
        positives = labels == c
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives, probabilities[:, c])
            auc = roc_auc_score(positives, probabilities[:, c])
            ax.plot(fpr, tpr, lw=1.0, alpha=0.7, label=f"{name} (AUC {auc:.3f})")
            drawn += 1
    onehot = labels[:, None] == np.arange(probabilities.shape[1])[None, :]
    if onehot.any(axis=0).sum() > 1:
        fpr, tpr, _ = roc_curve(onehot.ravel(), probabilities.ravel())
        auc = roc_auc_score(onehot.ravel(), probabilities.ravel())
        ax.plot(fpr, tpr, color="black", lw=2.5, label=f"micro average (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    _finish_curves(
        ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)",
        f"One-vs-rest ROC curves ({drawn} classes)", drawn, loc="lower right", summary_lines=2,
    )
    return _save(fig, path)


def _finish_curves(
    ax: Any, xlabel: str, ylabel: str, title: str, drawn: int, *, loc: str, summary_lines: int
) -> None:
    """Unit axes, labels and a legend of every class curve; past 15 classes only the last ``summary_lines``."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn <= 15:
        ax.legend(fontsize=7, loc=loc)
    else:
        ax.legend(handles=ax.get_lines()[-summary_lines:], fontsize=8, loc=loc)


def equal_mass_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int | None = None) -> list[dict]:
    """Reliability bins holding (nearly) the same number of images each, so no point rests on one or two images.

    By default about sqrt(n) bins of at least 5 images (3 to 15 bins): 31 images give 5 bins of 6-7, 1,000
    give 15 of 66-67. Each bin: mean confidence, accuracy, count, and its confidence range.
    """
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    n = len(confidence)
    if n == 0:
        return []
    if n_bins is None:
        n_bins = int(np.clip(int(np.sqrt(n)), 3, 15))
        n_bins = max(1, min(n_bins, n // 5))
    order = np.argsort(confidence, kind="stable")
    return [
        {
            "confidence": float(confidence[idx].mean()),
            "accuracy": float(correct[idx].mean()),
            "count": len(idx),
            "lower": float(confidence[idx].min()),
            "upper": float(confidence[idx].max()),
        }
        for idx in np.array_split(order, n_bins)
        if len(idx)
    ]


def plot_reliability(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, n_bins: int = 15
) -> Path:
    """Reliability diagram: accuracy against mean confidence in equal-mass bins (:func:`equal_mass_bins`), one
    line per named set of probabilities, with the ECE of the metric (``n_bins`` equal-width bins, as in
    metrics.json) in the legend; below it, how many images fall at each confidence, in counts."""
    fig = Figure(figsize=(6.5, 7.5))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    per_bin = 0
    for name, (labels, probabilities) in curves.items():
        labels, probabilities = np.asarray(labels), np.asarray(probabilities, np.float64)
        ece, _ = expected_calibration_error(labels, probabilities, n_bins)
        bins = equal_mass_bins(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels)
        per_bin = round(len(labels) / max(1, len(bins)))
        line = ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            lw=1.5,
            label=f"{name} (ECE {ece:.3f})",
        )[0]
        hist.hist(
            probabilities.max(axis=1), bins=np.linspace(0, 1, 21), histtype="step", lw=1.5, color=line.get_color()
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed accuracy")
    ax.set_title(f"Reliability diagram (equal-mass bins of ~{per_bin} images)")
    ax.legend(fontsize=8, loc="upper left")
    hist.set_xlabel("confidence of the predicted class")
    hist.set_ylabel("images")
    hist.yaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_precision_recall(
    labels: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """One-vs-rest precision-recall curve per class with positives (average precision in the legend) and the
    micro average; each class's prevalence is the precision of a model that guesses."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    drawn = 0
    for c, name in enumerate(label_names):
        positives = labels == c
        if positives.any():
            precision, recall, _ = precision_recall_curve(positives, probabilities[:, c])
            ap = average_precision_score(positives, probabilities[:, c])
            ax.step(recall, precision, where="post", lw=1.0, alpha=0.7, label=f"{name} (AP {ap:.3f})")
            drawn += 1
    onehot = labels[:, None] == np.arange(probabilities.shape[1])[None, :]
    if drawn > 1:
        precision, recall, _ = precision_recall_curve(onehot.ravel(), probabilities.ravel())
        ap = average_precision_score(onehot.ravel(), probabilities.ravel())
        ax.step(recall, precision, where="post", color="black", lw=2.5, label=f"micro average (AP {ap:.3f})")
    _finish_curves(
        ax, "recall (sensitivity)", "precision (positive predictive value)",
        f"One-vs-rest precision-recall curves ({drawn} classes)", drawn, loc="lower left", summary_lines=1,
    )
    return _save(fig, path)


LEARNING_CURVE_PANELS = (
    ("loss", (("train/loss_epoch", "train"), ("val/loss", "validation"))),
    ("accuracy", (("val/accuracy", "validation"),)),
    ("macro-F1", (("val/macro_f1", "validation"),)),
    ("learning rate", (("train/lr", "end of epoch"),)),
)


def plot_learning_curves(records: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """Loss, accuracy, macro-F1 and learning rate per epoch from a run's ``logs/metrics.jsonl`` records (as
    :func:`derm_accel.core.tracking.read_metrics` returns them); None when no epoch was logged."""
    epochs = [r for r in records if "epoch" in r and "val/accuracy" in r]
    if not epochs:
        return None
    x = [r["epoch"] for r in epochs]
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (title, series) in zip(axes, LEARNING_CURVE_PANELS, strict=True):
        for key, name in series:
            values = [r.get(key) for r in epochs]
            if any(isinstance(v, (int, float)) for v in values):
                ax.plot(x, [v if isinstance(v, (int, float)) else np.nan for v in values], marker="o", label=name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("Learning curves (from the run's logs/metrics.jsonl)")
    return _save(fig, path)


def plot_examples(
    images: Sequence[Image.Image], titles: Sequence[str], path: str | os.PathLike, columns: int = 4
) -> Path:
    """A grid of thumbnails with one caption each (an empty note when there is nothing to show)."""
    if not images:
        fig = Figure(figsize=(5, 1.5))
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "No misclassified examples in this split.", ha="center", va="center")
        return _save(fig, path)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(3.0 * columns, 3.3 * rows))
    for k, (image, title) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, columns, k + 1)
        thumb = image.copy()
        thumb.thumbnail((256, 256))
        ax.imshow(np.asarray(thumb))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return _save(fig, path)


def plot_risk_coverage(
    confidence: np.ndarray, correct: np.ndarray, path: str | os.PathLike, block: dict | None = None
) -> Path:
    """Error among answered images vs share answered (most confident first), with the model's operating point."""
    curve = risk_coverage(np.asarray(confidence), np.asarray(correct))
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    ax.plot(curve["coverage"], curve["risk"], label=f"model (AURC {curve['aurc']:.3f})")
    ax.axhline(1 - float(np.mean(correct)), color="grey", linestyle=":", label="error when answering all")
    guard = (block or {}).get("guard") or {}
    if guard.get("error_among_answered") is not None:
        ax.scatter([guard["answered"]], [guard["error_among_answered"]], color="crimson", zorder=3,
                   label="with the guard and abstention threshold")
    ax.set(xlabel="coverage (share of images answered)", ylabel="risk (error among answered)",
           xlim=(0, 1), ylim=(0, 1), title="Risk-coverage")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
