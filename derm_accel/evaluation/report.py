"""The written artifacts of an evaluation: metrics.json, CSV tables and the Markdown report.

metrics.json is the contract with the push stage (model card); predictions.csv holds everything needed to
recompute every number in it, so a reviewer can audit the report without running the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm_accel.core.artifacts import METRIC_NAMES, fmt, pct
from derm_accel.core.escape import csv_writer, md_code, md_text
from derm_accel.evaluation.label_map import report_lines as external_report_lines
from derm_accel.evaluation.ood import render_ood_section
from derm_accel.evaluation.subgroups import report_lines as subgroup_report_lines

PREDICTION_COLUMNS = ("index", "source_path", "true_label", "predicted_label")
SUMMARY_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "top3_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "roc_auc_macro",
    "roc_auc_micro",
    "nll",
    "ece",
    "ci95",
)
_TABLE_KEYS = ("accuracy", "balanced_accuracy", "top3_accuracy", "macro_f1", "roc_auc_macro", "nll", "ece")


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a metric result (what before/after comparisons show)."""
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


def write_per_class_csv(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """One row per class; empty cells where a value is undefined (class without samples)."""
    path = Path(path)
    fields = ("precision", "recall", "f1", "support", "roc_auc", "pr_auc")
    with path.open("w", newline="") as f:
        writer = csv_writer(f)
        writer.writerow(("class", *fields))
        for name, row in metrics["per_class"].items():
            writer.writerow((name, *("" if row[k] is None else row[k] for k in fields)))
    return path


def write_predictions_csv(
    path: str | os.PathLike,
    source_paths: Sequence[str],
    labels: np.ndarray,
    probabilities: np.ndarray,
    label_names: Sequence[str],
    extra: dict[str, Sequence[Any]] | None = None,
) -> Path:
    """One row per sample in split order; float32 probabilities (written losslessly) under each class name;
    ``extra`` columns (e.g. subgroup values) after them."""
    extra = extra or {}
    clash = sorted(set(PREDICTION_COLUMNS) & set(label_names))
    if clash:
        raise ValueError(f"class names {clash} clash with predictions.csv columns {list(PREDICTION_COLUMNS)}")
    clash = sorted(set(extra) & {*PREDICTION_COLUMNS, *label_names})
    if clash:
        raise ValueError(f"subgroup columns {clash} clash with predictions.csv columns or class names")
    probabilities = np.asarray(probabilities, dtype=np.float32)
    predicted = probabilities.argmax(axis=1)
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv_writer(f)
        writer.writerow((*PREDICTION_COLUMNS, *label_names, *extra))
        for i, (src, y, p, row) in enumerate(
            zip(source_paths, labels, predicted, probabilities, strict=True)
        ):
            cells = (f"{v:.9g}" for v in row)
            writer.writerow((i, src, label_names[int(y)], label_names[int(p)], *cells, *(c[i] for c in extra.values())))
    return path


def confused_pairs(
    confusion_matrix: Sequence[Sequence[int]], label_names: Sequence[str], top: int = 20
) -> list[dict[str, Any]]:
    """Off-diagonal cells by count: which true class is most often taken for which other class."""
    counts = np.asarray(confusion_matrix, dtype=np.int64)
    support = counts.sum(axis=1)
    pairs = [
        {
            "true": label_names[i],
            "predicted": label_names[j],
            "count": int(counts[i, j]),
            "share_of_true": float(counts[i, j] / support[i]),
        }
        for i in range(len(label_names))
        for j in range(len(label_names))
        if i != j and counts[i, j] > 0
    ]
    pairs.sort(key=lambda p: (-p["count"], p["true"], p["predicted"]))
    return pairs[:top]


def write_misclassifications_md(
    metrics: dict[str, Any], path: str | os.PathLike, *, examples_png: str, top: int = 20
) -> Path:
    pairs = confused_pairs(metrics["confusion_matrix"], metrics["label_names"], top)
    errors = metrics["num_samples"] - int(np.trace(np.asarray(metrics["confusion_matrix"])))
    lines = [
        f"# Misclassifications ({metrics['split']} split)",
        "",
        f"{errors} of {metrics['num_samples']} images were given the wrong label. The table lists the most "
        f"frequent confusions (true class taken for predicted class); 'share' is the fraction of that "
        "true class.",
        "",
    ]
    if pairs:
        lines += ["| true class | predicted as | count | share |", "|---|---|---:|---:|"]
        lines += [
            f"| {md_text(p['true'])} | {md_text(p['predicted'])} | {p['count']} | {pct(p['share_of_true'])} |"
            for p in pairs
        ]
    else:
        lines.append("No misclassifications.")
    lines += [
        "",
        f"![Misclassified examples]({examples_png})",
        "",
        f"`{examples_png}` shows the most confident mistakes (true label, predicted label and the "
        "probability the "
        "model gave its prediction). Confident mistakes are the ones worth a clinician's look: they can "
        "be label "
        "noise in the data, look-alike conditions, or a real blind spot of the model.",
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _before_after_table(block: dict[str, Any], before: str, after: str) -> list[str]:
    lines = [f"| metric | {before} | {after} | change |", "|---|---:|---:|---:|"]
    for key in _TABLE_KEYS:
        title = METRIC_NAMES[key]
        b, a = block["before"].get(key), block["after"].get(key)
        change = "n/a" if a is None or b is None else f"{a - b:+.3f}"
        lines.append(f"| {title} | {fmt(b)} | {fmt(a)} | {change} |")
    return lines


def render_report(metrics: dict[str, Any], files: dict[str, str]) -> str:
    """report.md: plain language first (for a clinician), then tables and method notes (for a reviewer)."""
    options: list[str] = []
    if metrics.get("tta"):
        options.append(
            "test-time augmentation (average of original, horizontally and vertically flipped image)"
        )
    if metrics.get("calibration"):
        options.append(
            f"temperature scaling (T = {metrics['calibration']['temperature']:.3f}, fitted on the "
            "validation split)"
        )

    lines = [
        *_summary_lines(metrics, options),
        *_before_after_lines(metrics),
        *_class_lines(metrics, files),
    ]
    lines += external_report_lines(metrics) + subgroup_report_lines(metrics) + ensemble_report_lines(metrics)
    if metrics.get("out_of_domain"):
        lines += render_ood_section(metrics["out_of_domain"], files.get("risk_coverage"))
    lines += _appendix_lines(metrics, files, options)
    return "\n".join(lines)


def ensemble_report_lines(metrics: dict[str, Any]) -> list[str]:
    """The ensemble beside each of its members, on the same images with the same options."""
    block = metrics.get("ensemble")
    if not block:
        return []
    lines = [
        "## Ensemble and its members",
        "",
        f"The model is an ensemble of {len(block['members'])}: {block['combine']}. Each member alone, on the same "
        f"images{' with the same test-time augmentation' if metrics.get('tta') else ''} (before any calibration):",
        "",
        "| model | accuracy | balanced accuracy | macro-F1 |",
        "|---|---|---|---|",
    ]
    scored = [m for m in block["members"] if "macro_f1" in m]
    for m in scored:
        lines.append(
            f"| {md_text(m['model'])} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | {m['macro_f1']:.3f} |"
        )
    if not scored:
        lines.append("| (members are not scored one by one with a label map) | | | |")
    lines.append(
        f"| **ensemble** | **{metrics['accuracy']:.3f}** | **{metrics['balanced_accuracy']:.3f}** | "
        f"**{metrics['macro_f1']:.3f}** |"
    )
    if metrics.get("calibration"):
        lines += ["", "The ensemble row includes the temperature scaling above."]
    lines += ["", f"Out-of-domain verdicts use {block['guard']}.", ""]
    return lines


def _summary_lines(metrics: dict[str, Any], options: list[str]) -> list[str]:
    """Title, options, the results in plain words and the headline table."""
    n = metrics["num_samples"]
    ci = metrics.get("ci95") or {}
    acc_ci = ci.get("accuracy")
    f1_ci = ci.get("macro_f1")
    per_class = metrics["per_class"]
    present = {k: v for k, v in per_class.items() if v["support"] > 0}
    by_recall = sorted(present.items(), key=lambda kv: kv[1]["recall"])
    correct = int(np.trace(np.asarray(metrics["confusion_matrix"])))
    lines: list[str] = [
        f"# Evaluation report: {md_text(metrics['model'])}",
        "",
        f"- Data: {md_code(metrics.get('data', ''))}, split **{md_text(metrics['split'])}**, {n} images, "
        f"{len(metrics['label_names'])} classes",
        f"- Options: {'; '.join(options) if options else 'none (single view, uncalibrated softmax)'}",
        "",
        "## In plain words",
        "",
        f"- The model named the correct condition for **{correct} of {n} images** "
        f"({pct(metrics['accuracy'])}"
        + (f"; 95% interval {pct(acc_ci[0])} to {pct(acc_ci[1])}" if acc_ci else "")
        + ").",
        f"- Giving every condition equal weight, it finds on average "
        f"{pct(metrics['balanced_accuracy'])} of the "
        "images of a condition (balanced accuracy). Rare conditions count as much as common ones here.",
        f"- The correct condition was among its three most likely answers for "
        f"{pct(metrics['top3_accuracy'])} "
        "of the images.",
    ]
    k = min(3, len(by_recall) // 2)  # best and worst lists must not overlap
    if k:
        worst = ", ".join(f"{md_text(c)} ({pct(v['recall'])} of {v['support']})" for c, v in by_recall[:k])
        best = ", ".join(f"{md_text(c)} ({pct(v['recall'])} of {v['support']})" for c, v in by_recall[::-1][:k])
        lines += [f"- Most often recognised: {best}.", f"- Most often missed: {worst}."]
    lines += [
        f"- Its stated confidence differs from how often it is actually right by {pct(metrics['ece'])} on "
        "average (expected calibration error; 0% would mean a stated 80% is right 80% of the time). The "
        "reliability diagram shows at which confidence levels it over- or under-states.",
        (
            "- This is a retrospective test on held-out images from the same collection the model was "
            "trained on. "
            "It does not show how the model performs on other cameras, clinics or skin tones, and it is not a "
            "clinical validation."
            if not metrics.get("external_validation")
            else "- This is an external validation on a collection the model was not trained on, scored on the "
            "classes the model knows (see the class mapping below). It is retrospective, not a clinical validation."
        ),
        "",
        "## Headline metrics",
        "",
        "| metric | value | 95% interval |",
        "|---|---:|---:|",
        f"| Accuracy | {fmt(metrics['accuracy'])} | "
        + (f"{fmt(acc_ci[0])}–{fmt(acc_ci[1])}" if acc_ci else "")
        + " |",
        f"| Balanced accuracy | {fmt(metrics['balanced_accuracy'])} | |",
        f"| Top-3 accuracy | {fmt(metrics['top3_accuracy'])} | |",
        f"| Macro precision / recall / F1 | {fmt(metrics['macro_precision'])} / "
        f"{fmt(metrics['macro_recall'])} / "
        f"{fmt(metrics['macro_f1'])} | F1: " + (f"{fmt(f1_ci[0])}–{fmt(f1_ci[1])}" if f1_ci else "") + " |",
        f"| Weighted precision / recall / F1 | {fmt(metrics['weighted_precision'])} / "
        f"{fmt(metrics['weighted_recall'])} / {fmt(metrics['weighted_f1'])} | |",
        f"| ROC-AUC macro / micro | {fmt(metrics['roc_auc_macro'])} / {fmt(metrics['roc_auc_micro'])} | |",
        f"| Negative log-likelihood | {fmt(metrics.get('nll'))} | |",
        f"| Expected calibration error (15 bins) | {fmt(metrics['ece'])} | |",
        "",
    ]
    return lines


def _before_after_lines(metrics: dict[str, Any]) -> list[str]:
    """Test-time augmentation and calibration: the metrics before and after each."""
    lines: list[str] = []
    if metrics.get("tta"):
        lines += [
            "## Test-time augmentation: before and after",
            "",
            "Before: the original image only. After: softmax averaged over the original, horizontally and "
            "vertically flipped image (uncalibrated in both columns).",
            "",
        ]
        lines += [*_before_after_table(metrics["tta"], "original only", "flip TTA"), ""]
    if metrics.get("calibration"):
        cal = metrics["calibration"]
        lines += [
            "## Calibration: before and after",
            "",
            f"One temperature T = {cal['temperature']:.3f} divides the logits before the softmax. It "
            "was fitted "
            f"on the {cal['validation_samples']} validation images by minimising their negative "
            f"log-likelihood (LBFGS), which went from {cal['validation_nll_before']:.3f} to "
            f"{cal['validation_nll_after']:.3f}. Temperature scaling never changes which class is "
            "predicted, only how confident the model says it is"
            + (
                " (the TTA average of tempered softmaxes can, rarely, change a top class)"
                if metrics.get("tta")
                else ""
            )
            + ".",
            "",
        ]
        lines += [*_before_after_table(cal, "uncalibrated", "calibrated"), ""]
    return lines


def _class_lines(metrics: dict[str, Any], files: dict[str, str]) -> list[str]:
    """Per-class table, classes without samples and the most frequent confusions."""
    per_class = metrics["per_class"]
    lines: list[str] = []
    lines += [
        "## Per-class results",
        "",
        "Recall is the sensitivity for that condition; precision is the positive predictive value in "
        "this split "
        "(it depends on how common the condition is here).",
        "",
        "| class | support | precision | recall | F1 | ROC-AUC | PR-AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in per_class.items():
        lines.append(
            f"| {md_text(name)} | {row['support']} | {fmt(row['precision'])} | {fmt(row['recall'])} | "
            f"{fmt(row['f1'])} | {fmt(row['roc_auc'])} | {fmt(row['pr_auc'])} |"
        )
    lines.append("")
    missing = metrics.get("classes_without_samples") or []
    lines += ["## Classes without samples", ""]
    if missing:
        lines += [
            f"{len(missing)} class(es) have no image in this split: {', '.join(map(md_text, missing))}. Nothing can "
            "be said about "
            "how well the model recognises them. They are left out of the macro averages (balanced "
            "accuracy, macro "
            "precision/recall/F1 average over the classes present only) and out of the ROC-AUC and PR-AUC "
            "averages (an AUC needs positive cases); their recall, F1 and AUCs are `null` in "
            "metrics.json and "
            "empty in per_class.csv. A prediction of such a class still counts as an error in accuracy, "
            "and its "
            "precision is reported when the model predicted it. The micro ROC-AUC keeps their columns as "
            "negatives.",
        ]
    else:
        lines.append("Every class has at least one image in this split.")
    pairs = confused_pairs(metrics["confusion_matrix"], metrics["label_names"], 5)
    lines += ["", "## Most frequent confusions", ""]
    if pairs:
        lines += [
            f"- {md_text(p['true'])} taken for {md_text(p['predicted'])}: {p['count']} ({pct(p['share_of_true'])} of "
            f"{md_text(p['true'])})"
            for p in pairs
        ]
    else:
        lines.append("- none")
    lines += ["", f"Full list: [{files['misclassifications']}]({files['misclassifications']}).", ""]
    return lines


def _appendix_lines(metrics: dict[str, Any], files: dict[str, str], options: list[str]) -> list[str]:
    """Figures, the files of the report and the method notes."""
    lines: list[str] = []
    lines += [
        "## Figures",
        "",
        f"![Confusion matrix]({files['confusion_matrix']})",
        "",
        f"![ROC curves]({files['roc_curves']})",
        "",
        f"![Precision-recall curves]({files['precision_recall']})",
        "",
        f"![Reliability diagram]({files['reliability']})",
        "",
        *([f"![Learning curves]({metrics['learning_curves']})", ""] if metrics.get("learning_curves") else []),
        f"![Misclassified examples]({files['examples']})",
        "",
        "## Files",
        "",
        f"- `{files['metrics']}`: every number above (machine-readable; read by the push stage for the "
        "model card).",
        f"- `{files['per_class']}`: the per-class table.",
        f"- `{files['predictions']}`: one row per image: source path, true and predicted label, and the "
        "probability of every class. These are the **final** probabilities"
        + (" (after test-time augmentation and temperature scaling)" if options else "")
        + "; every number in metrics.json can be recomputed from this file.",
        "",
        "## Method notes",
        "",
        "- Metrics come from the `derm_metrics` module of the `evaluate` library shipped with derm-accel "
        "(scikit-learn and SciPy underneath; ROC-AUC from tie-averaged ranks, PR-AUC as average precision).",
        "- 95% intervals: percentile bootstrap over images, 1000 resamples, seed 0.",
        "- Expected calibration error: 15 equal-width bins of the top-class confidence.",
        "- Top-3 accuracy ties are broken as scikit-learn's `top_k_accuracy_score` does.",
        "",
    ]
    return lines
