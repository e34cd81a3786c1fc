"""The evaluate stage: RUN/best (or a Hub model) + DATA/ -> REPORT/.

Reads a model and a dataset split, scores it on every available process, and writes metrics.json, CSV tables,
figures and report.md on the main process. Under ``accelerate launch`` every rank returns the same metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..artifacts import METRICS
from ..data.transforms import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    BatchNormalize,
    decode_image,
    decode_size,
    eval_input,
    with_transform,
)
from ..distributed import use_cpu_ranks_without_gpu
from ..ensemble import (
    Ensemble,
    MemberLogits,
    check_not_trained_on,
    combine_members,
    display_name,
    expand_sources,
    load_models,
    member_metrics,
    split_members,
)
from ..errors import InputError
from ..fileio import atomic_write_json
from ..models import data_config
from ..paths import shareable_path
from ..tta import resolve as resolve_tta
from . import plots
from .calibration import fit_temperature, negative_log_likelihood, tta_probabilities
from .inference import predict_logits
from .label_map import UNSCORED_FILE, External, apply_label_map, load_label_map, map_labels, resolve_label_map
from .report import (
    render_report,
    summary,
    write_misclassifications_md,
    write_per_class_csv,
    write_predictions_csv,
)
from .subgroups import check_columns, evaluate_subgroups, parse_subgroups, write_subgroup_outputs

logger = logging.getLogger(__name__)

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


class LabelMismatchError(InputError):
    """The model's label names differ from the dataset's: scoring would silently misalign classes."""


def load_metric() -> Any:
    """The shipped ``derm_metrics`` module through ``evaluate`` (offline: loaded from the package folder)."""
    import evaluate

    return evaluate.load(str(METRIC_MODULE_DIR), keep_in_memory=True)


def load_split(data: str | os.PathLike, split: str) -> tuple[Any, Any]:
    """The DatasetDict written by ``derm-accel convert`` and one of its splits, with clear errors."""
    from datasets import ClassLabel, DatasetDict, load_from_disk

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"No dataset at {path}. Pass the folder written by `derm-accel convert`.")
    dataset = load_from_disk(str(path))
    if not isinstance(dataset, DatasetDict):
        raise ValueError(f"{path} holds a single split; expected a DatasetDict with train/validation/test.")
    if split not in dataset:
        raise ValueError(f"{path} has no split {split!r}; available: {sorted(dataset)}.")
    features = dataset[split].features
    if not isinstance(features.get(LABEL_COLUMN), ClassLabel) or IMAGE_COLUMN not in features:
        raise ValueError(
            f"{path}[{split}] needs an '{IMAGE_COLUMN}' column and a ClassLabel '{LABEL_COLUMN}' column "
            f"(found {dict(features)}); re-create it with `derm-accel convert`."
        )
    return dataset, dataset[split]


def check_label_names(
    model_labels: list[str], data_labels: list[str], model: str, data: str | os.PathLike
) -> None:
    """Refuse to score when class index i does not mean the same class for the model and the data."""
    if list(model_labels) != list(data_labels):
        only_model = sorted(set(model_labels) - set(data_labels))
        only_data = sorted(set(data_labels) - set(model_labels))
        hint = (
            "same names in another order"
            if not only_model and not only_data
            else f"only in the model: {only_model}; only in the data: {only_data}"
        )
        raise LabelMismatchError(
            f"Label names of model {model} do not match the dataset {data} ({hint}).\n"
            f"  model: {list(model_labels)}\n  data:  {list(data_labels)}\n"
            "Evaluate the model on the dataset it was trained for (same class folders, converted the "
            "same way), or map an external dataset's classes onto the model's with --label-map FILE."
        )


def _report_name(model: str | list[str], split: str) -> tuple[str, str]:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), split
    return os.fspath(model[0]), f"{split}-ensemble{len(model)}" if len(model) > 1 else split


def default_out_dir(model: str, split: str) -> Path:
    """reports/<model folder>-<split>; RUN/best becomes RUN-best so that runs do not overwrite each other."""
    source = model.split(":", 1)[1] if model.startswith(("hf-hub:", "local-dir:")) else model
    path = Path(source.rstrip("/"))
    name = path.name
    if name in {"best", "last", "final"} and path.parent.name:
        name = f"{path.parent.name}-{name}"
    from derm_accel.paths import fit_name  # RUN-best of a 250-byte RUN name: still one valid folder name

    return Path("reports") / fit_name(name, f"-{split}")


def _score(
    metric: Any, labels: np.ndarray, probabilities: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    probabilities = probabilities.astype(np.float32)
    return metric.compute(
        predictions=probabilities.argmax(axis=1),
        probabilities=probabilities,
        references=labels,
        label_names=label_names,
        ece_bins=ECE_BINS,
        bootstrap=BOOTSTRAP_RESAMPLES,
        seed=BOOTSTRAP_SEED,
    )


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
        titles.append(
            f"true: {names[labels[i]]}\npred: {names[predicted[i]]} ({probabilities[i, predicted[i]]:.0%})"
        )
    return images, titles


def evaluate_model(
    model: str | list[str],
    data: str | Path,
    *,
    split: str = "test",
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    tta: str | None = None,
    calibrate: bool = False,
    channels_last: bool = True,
    mixed_precision: str | None = None,
    max_thumbnails: int = 16,
    label_map: str | os.PathLike | None = None,
    subgroups: str | list[str] | None = None,
    ood: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate ``model`` (RUN/best, a model folder or ORG/NAME) on ``data[split]``; return the metrics.

    Several models (a list, or an ensemble folder such as a ``train --folds`` run) are evaluated as one
    ensemble averaging their probabilities; metrics.json and the report also score each member alone.

    ``tta="flip"`` averages the softmax over the original and flipped images (None: the TTA the model's
    config declares, ``"none"``: single view); ``calibrate`` fits a
    temperature on the validation split. Both are reported before and after in metrics.json and report.md;
    predictions.csv holds the final probabilities. ``label_map`` (YAML/JSON, dataset class -> model class)
    scores an external dataset with other class names; images of classes the model does not know are reported
    apart. ``subgroups`` ("age,sex") adds per-group metrics (subgroups.csv, plot, report section).
    """
    if calibrate and split == "validation":
        raise ValueError(
            "--calibrate fits the temperature on the validation split, so evaluating that same split would "
            "report optimistic calibration. Evaluate --split test, or drop --calibrate."
        )
    use_cpu_ranks_without_gpu()
    accelerator = Accelerator()
    sources = expand_sources(model)
    names = ", ".join(map(display_name, sources))
    if out_dir is None:  # named after the argument: an ensemble folder's report never lands on a member's
        out_dir = default_out_dir(*_report_name(model, split))
    check_not_trained_on(model, data, split)
    model = sources[0] if len(sources) == 1 else f"ensemble of {len(sources)}: {names}"
    report_dir = Path(out_dir)
    net, model_labels = load_models(sources)
    members = net.member_names if isinstance(net, Ensemble) else None
    tta = resolve_tta(tta, net)  # None: the model's own (config.json derm_accel.tta); "none": single view
    dataset, raw_split = load_split(data, split)
    data_labels = list(raw_split.features[LABEL_COLUMN].names)
    mapping = resolve_label_map(load_label_map(label_map), data_labels, model_labels) if label_map else None
    if mapping is None:
        check_label_names(model_labels, data_labels, model, data)
    subgroup_spec = parse_subgroups(subgroups)
    check_columns(raw_split, subgroup_spec)
    if calibrate and "validation" not in dataset:
        raise ValueError(f"{data} has no 'validation' split to fit the temperature on; drop --calibrate.")

    cfg = data_config(net)
    transform, decode = eval_input(cfg)  # uint8 batches, normalised on the device, where timm's eval allows
    min_size = decode_size(tuple(cfg["input_size"][-2:]), cfg.get("crop_pct"))
    infer = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        tta=tta,
        channels_last=channels_last,
        mixed_precision=mixed_precision,
        normalize=BatchNormalize(cfg),
        progress=progress,
    )
    scored_net = MemberLogits(net) if members else net
    result = predict_logits(
        scored_net, with_transform(raw_split, transform, min_size=min_size, decode=decode), accelerator, **infer
    )
    member_rows = None
    if members:  # one pass gave every member's logits: score each, then average them into the ensemble
        per_member = split_members(result.logits, len(members))
        if mapping is None:
            member_rows = member_metrics(per_member, result.labels.numpy(), members)
        result = dataclasses.replace(result, logits=combine_members(per_member))
    val = None
    if calibrate:
        val_split = with_transform(dataset["validation"], transform, min_size=min_size, decode=decode)
        val = predict_logits(net, val_split, accelerator, **infer)
    scored_split, external, label_names = raw_split, None, data_labels
    if mapping is not None:  # external validation: known classes in the model's indices, the rest set apart
        result, scored_split, external = apply_label_map(result, raw_split, mapping)
        val, label_names = (map_labels(val, mapping) if val is not None else None), list(model_labels)

    metrics: dict[str, Any] | None = None
    if accelerator.is_main_process:
        ood_block = out_of_domain_block(
            sources[0], scored_split, ood or [], report_dir / FILES["risk_coverage"],
            label_target=None if mapping is None else list(mapping.target), device=str(accelerator.device),
            tta=tta,
        )
        metrics = _write_outputs(
            ood_block=ood_block,
            model=model,
            data=data,
            split=split,
            raw_split=scored_split,
            label_names=label_names,
            external=external,
            subgroups=subgroup_spec,
            logits=result.logits,
            labels=result.labels,
            views=result.views,
            tta=tta,
            val=val,
            out_dir=report_dir,
            max_thumbnails=max_thumbnails,
            ensemble=None if members is None else ensemble_block(sources, member_rows),
        )
    metrics = broadcast_object_list([metrics])[0] if accelerator.num_processes > 1 else metrics
    accelerator.wait_for_everyone()
    return {**metrics, "report_dir": str(report_dir)}


def _write_outputs(
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
    metric = load_metric()
    y = labels.numpy()

    # The chain: original view -> (TTA) view average -> (calibration) tempered view average.
    stages: dict[str, Any] = {}
    uncalibrated = tta_probabilities(logits).numpy()
    temperature = 1.0
    if val is not None:
        temperature = fit_temperature(val.logits, val.labels)
    final = tta_probabilities(logits, temperature).numpy()
    final_metrics = _score(metric, y, final, label_names)

    if tta is not None:
        single = _score(metric, y, tta_probabilities(logits[:, :1]).numpy(), label_names)
        after = final_metrics if val is None else _score(metric, y, uncalibrated, label_names)
        stages["tta"] = {
            "method": tta,
            "views": list(views),
            "before": summary(single),
            "after": summary(after),
        }
    if val is not None:
        before = (
            stages["tta"]["after"]
            if "tta" in stages
            else summary(_score(metric, y, uncalibrated, label_names))
        )
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
        from ..tracking import read_metrics

        drawn = plots.plot_learning_curves(read_metrics(logs), out_dir / FILES["learning_curves"])
        metrics["learning_curves"] = FILES["learning_curves"] if drawn else None
    atomic_write_json(out_dir / FILES["metrics"], metrics)
    write_per_class_csv(metrics, out_dir / FILES["per_class"])
    plots.plot_confusion_matrix(metrics["confusion_matrix"], label_names, out_dir / FILES["confusion_matrix"])
    plots.plot_roc_curves(y, final, label_names, out_dir / FILES["roc_curves"])
    plots.plot_precision_recall(y, final, label_names, out_dir / FILES["precision_recall"])
    curves = (
        {"uncalibrated": (y, uncalibrated), "calibrated": (y, final)}
        if val is not None
        else {"model": (y, final)}
    )
    plots.plot_reliability(curves, out_dir / FILES["reliability"], ECE_BINS)
    images, titles = _examples(raw_split, y, final, label_names, max_thumbnails)
    plots.plot_examples(images, titles, out_dir / FILES["examples"])
    write_misclassifications_md(
        metrics, out_dir / FILES["misclassifications"], examples_png=FILES["examples"]
    )
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
    model: str,
    raw_split: Any,
    ood: list[str],
    plot_path: Path,
    *,
    label_target: list[int] | None = None,
    device: str = "cpu",
    tta: str | None = None,
) -> dict[str, Any] | None:
    """The guard's figures on the evaluated split and on each ``--ood`` set, with the risk-coverage plot.

    Runs when ``--ood`` is given or the model carries a domain guard; None otherwise. ``label_target`` maps the
    split's label indices to the model's (``--label-map``; the split holds only images of known classes).
    """
    from derm_accel.evaluation.ood import evaluate_ood
    from derm_accel.guard.model import load_guard
    from derm_accel.models import resolve_model_source

    if not ood and load_guard(resolve_model_source(model)) is None:
        return None
    block, curve = evaluate_ood(model, raw_split, ood, label_target=label_target, device=device, tta=tta or "none")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plots.plot_risk_coverage(curve["confidence"], curve["correct"], plot_path, block)
    return block
