"""Figures of the evaluation report, drawn with matplotlib's Agg canvas.

Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global backend switch), so
plotting works on headless nodes and never interferes with a notebook's backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve

from .calibration import expected_calibration_error


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
    """One-vs-rest ROC curve per class that has positives and negatives, plus the micro average."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    drawn = 0
    for c, name in enumerate(label_names):
        positives = labels == c
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives, probabilities[:, c])
            ax.plot(fpr, tpr, lw=1.0, alpha=0.7, label=name)
            drawn += 1
    onehot = labels[:, None] == np.arange(probabilities.shape[1])[None, :]
    if onehot.any(axis=0).sum() > 1:
        fpr, tpr, _ = roc_curve(onehot.ravel(), probabilities.ravel())
        ax.plot(fpr, tpr, color="black", lw=2.5, label="micro average")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"One-vs-rest ROC curves ({drawn} classes)")
    if drawn <= 15:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.legend(handles=ax.get_lines()[-2:], fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_reliability(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, n_bins: int = 15
) -> Path:
    """Reliability diagram: accuracy against confidence per bin, one line per named set of probabilities."""
    fig = Figure(figsize=(6.5, 6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, (labels, probabilities) in curves.items():
        ece, bins = expected_calibration_error(
            np.asarray(labels), np.asarray(probabilities, np.float64), n_bins
        )
        used = [b for b in bins if b["count"]]
        ax.plot(
            [b["confidence"] for b in used],
            [b["accuracy"] for b in used],
            marker="o",
            lw=1.5,
            label=f"{name} (ECE {ece:.3f})",
        )
    width = 1.0 / n_bins
    if curves:
        labels, probabilities = next(reversed(curves.values()))
        _, bins = expected_calibration_error(
            np.asarray(labels), np.asarray(probabilities, np.float64), n_bins
        )
        total = max(1, sum(b["count"] for b in bins))
        ax.bar(
            [b["lower"] for b in bins],
            [0.25 * b["count"] / total for b in bins],
            width=width,
            align="edge",
            color="lightsteelblue",
            alpha=0.6,
            label="share of samples (x0.25)",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("observed accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8, loc="upper left")
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
    from derm_accel.evaluation.ood import risk_coverage

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
