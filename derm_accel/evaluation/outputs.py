"""The files of an evaluation report: metrics.json, the CSVs, the plots and report.md, from the scores of one
run (:mod:`derm_accel.evaluation.run`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from derm_accel.core.artifacts import METRICS
from derm_accel.core.fileio import atomic_write_json
from derm_accel.core.paths import shareable_path
from derm_accel.core.tracking import read_metrics
from derm_accel.data.transforms import (
    IMAGE_COLUMN,
    decode_image,
)
from derm_accel.evaluation import plots
from derm_accel.evaluation.calibration import fit_temperature, negative_log_likelihood, tta_probabilities
from derm_accel.evaluation.derm_metrics.derm_metrics import compute_metrics
from derm_accel.evaluation.inference import InferenceResult
from derm_accel.evaluation.label_map import (
    UNSCORED_FILE,
    External,
)
from derm_accel.evaluation.ood import evaluate_ood, in_domain_scores
from derm_accel.evaluation.report import (
    render_report,
    summary,
    write_misclassifications_md,
    write_per_class_csv,
    write_predictions_csv,
)
from derm_accel.evaluation.subgroups import evaluate_subgroups, write_subgroup_outputs
from derm_accel.models.ensemble import (
    display_name,
)

logger = logging.getLogger(__name__)


def _examples(raw_split: Any, labels: np.ndarray, probabilities: np.ndarray, names: list[str], limit: int):
    """The most confident mistakes, as (image, caption) pairs."""
    from datasets import Image as ImageFeature

    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:limit]
    raw = raw_split.cast_column(IMAGE_COLUMN, ImageFeature(decode=False))
    images, titles = [], []
    for i in wrong.tolist():
        images.append(decode_image(raw[i][IMAGE_COLUMN]))
        titles.append(f"true: {names[labels[i]]}\npred: {names[predicted[i]]} ({probabilities[i, predicted[i]]:.0%})")
    return images, titles


def write_outputs(
    *,
    model: str,
    data: str | Path,
    split: str,
    raw_split: Any,
    label_names: list[str],
    logits: torch.Tensor,
    labels: torch.Tensor,
    views: tuple[str, ...],
    tta: str | None,
    val: Any,
    out_dir: Path,
    max_thumbnails: int,
    external: External | None = None,
    subgroups: list[tuple[str, str]] | None = None,
    ood_block: dict[str, Any] | None = None,
    ensemble: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    y = labels.numpy()

    # The chain: original view -> (TTA) view average -> (calibration) tempered view average.
    stages: dict[str, Any] = {}
    uncalibrated = tta_probabilities(logits).numpy()
    temperature = 1.0
    if val is not None:
        temperature = fit_temperature(val.logits, val.labels)
    final = tta_probabilities(logits, temperature).numpy()
    final_metrics = score(y, final, label_names)

    if tta is not None:
        single = score(y, tta_probabilities(logits[:, :1]).numpy(), label_names)
        after = final_metrics if val is None else score(y, uncalibrated, label_names)
        stages["tta"] = {
            "method": tta,
            "views": list(views),
            "before": summary(single),
            "after": summary(after),
        }
    if val is not None:
        before = stages["tta"]["after"] if "tta" in stages else summary(score(y, uncalibrated, label_names))
        stages["calibration"] = {
            "method": "temperature_scaling",
            "fitted_on": "validation",
            "validation_samples": len(val.labels),
            "temperature": temperature,
            "validation_nll_before": negative_log_likelihood(val.logits, val.labels),
            "validation_nll_after": negative_log_likelihood(val.logits, val.labels, temperature),
            "before": before,
            "after": summary(final_metrics),
        }

    metrics: dict[str, Any] = {
        "model": model if not Path(model).exists() else shareable_path(model),  # a Hub id stays as is
        "data": shareable_path(data),
        "split": split,
        "label_names": label_names,
        **final_metrics,
        "tta": stages.get("tta"),
        "calibration": stages.get("calibration"),
        "external_validation": external.summary(len(y), temperature) if external is not None else None,
        "out_of_domain": ood_block,
        "ensemble": ensemble,
        "predictions_file": FILES["predictions"],
        "predictions_note": "predictions.csv holds the final probabilities"
        + (" (after the options above)" if stages else ""),
    }

    sources = (
        raw_split["source_path"]
        if "source_path" in raw_split.column_names
        else [f"{split}[{i}]" for i in range(len(y))]
    )
    subgroup_columns = None
    if subgroups:
        metrics["subgroups"], subgroup_columns = evaluate_subgroups(
            raw_split, subgroups, y, final, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED
        )
        write_subgroup_outputs(metrics["subgroups"], out_dir)
    if external is not None:
        external.write(out_dir / UNSCORED_FILE, temperature)
    write_predictions_csv(out_dir / FILES["predictions"], sources, y, final, label_names, extra=subgroup_columns)
    logs = run_logs(model)
    if logs is not None:
        drawn = plots.plot_learning_curves(read_metrics(logs), out_dir / FILES["learning_curves"])
        metrics["learning_curves"] = FILES["learning_curves"] if drawn else None
    atomic_write_json(out_dir / FILES["metrics"], metrics)
    write_per_class_csv(metrics, out_dir / FILES["per_class"])
    plots.plot_confusion_matrix(metrics["confusion_matrix"], label_names, out_dir / FILES["confusion_matrix"])
    plots.plot_roc_curves(y, final, label_names, out_dir / FILES["roc_curves"])
    plots.plot_precision_recall(y, final, label_names, out_dir / FILES["precision_recall"])
    curves = {"uncalibrated": (y, uncalibrated), "calibrated": (y, final)} if val is not None else {"model": (y, final)}
    plots.plot_reliability(curves, out_dir / FILES["reliability"], ECE_BINS)
    images, titles = _examples(raw_split, y, final, label_names, max_thumbnails)
    plots.plot_examples(images, titles, out_dir / FILES["examples"])
    write_misclassifications_md(metrics, out_dir / FILES["misclassifications"], examples_png=FILES["examples"])
    (out_dir / FILES["report"]).write_text(render_report(metrics, FILES))
    logger.info("wrote the evaluation report to %s", out_dir)
    return metrics


def ensemble_block(sources: list[str], member_rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """metrics.json's ``ensemble``: how members are combined, and each member's own scores on the split."""
    return {
        "combine": "mean of the members' probabilities",
        "members": member_rows or [{"model": display_name(s)} for s in sources],
        "guard": "the first member's domain guard",
    }


def out_of_domain_block(
    models: list[str],
    result: InferenceResult,
    ood: list[str],
    plot_path: Path,
    *,
    device: str = "cpu",
    tta: str | None = None,
) -> dict[str, Any] | None:
    """The guard's figures on the evaluated split and on each ``--ood`` set, with the risk-coverage plot.

    ``result`` is evaluate's one pass over the split (labels in the model's indices; guard features when the
    model has a guard). Runs when ``--ood`` is given or the model carries a domain guard; None otherwise.
    """
    if not ood and result.features is None:
        return None
    in_dom = in_domain_scores(result.logits, result.labels, result.features)
    block, curve = evaluate_ood(models, in_dom, ood, device=device, tta=tta or "none")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plots.plot_risk_coverage(curve["confidence"], curve["correct"], plot_path, block)
    return block


METRIC_MODULE_DIR = Path(__file__).resolve().parent / "derm_metrics"


BOOTSTRAP_RESAMPLES = 1000


BOOTSTRAP_SEED = 0


ECE_BINS = 15


FILES = {
    "metrics": METRICS,
    "per_class": "per_class.csv",
    "predictions": "predictions.csv",
    "confusion_matrix": "confusion_matrix.png",
    "roc_curves": "roc_curves.png",
    "reliability": "reliability.png",
    "misclassifications": "misclassifications.md",
    "examples": "misclassified_examples.png",
    "report": "report.md",
    "risk_coverage": "risk_coverage.png",
    "precision_recall": "precision_recall.png",
    "learning_curves": "learning_curves.png",
}


def run_logs(model: str) -> Path | None:
    """``RUN/logs`` when ``model`` is a local ``RUN/best`` whose run logged ``metrics.jsonl`` beside it."""
    path = Path(model.removeprefix("local-dir:"))
    logs = path.parent / "logs"
    return logs if path.is_dir() and (logs / "metrics.jsonl").is_file() else None


def load_metric() -> Any:
    """The shipped ``derm_metrics`` module through ``evaluate`` (offline: loaded from the package folder)."""
    import evaluate

    return evaluate.load(str(METRIC_MODULE_DIR), keep_in_memory=True)


def score(labels: np.ndarray, probabilities: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """The shipped module's numbers (``compute_metrics``, what ``load_metric().compute`` returns) straight from
    the arrays: ``evaluate``'s Arrow round trip would turn an (N, C) split into N * C Python floats."""
    probabilities = probabilities.astype(np.float32)
    return compute_metrics(
        predictions=probabilities.argmax(axis=1),
        probabilities=probabilities,
        references=labels,
        label_names=label_names,
        ece_bins=ECE_BINS,
        bootstrap=BOOTSTRAP_RESAMPLES,
        seed=BOOTSTRAP_SEED,
    )
