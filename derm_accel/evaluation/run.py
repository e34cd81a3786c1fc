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

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from derm_accel.core.distributed import use_cpu_ranks_without_gpu
from derm_accel.core.errors import InputError
from derm_accel.core.paths import fit_name
from derm_accel.data.selection import load_converted
from derm_accel.data.trained_rows import refuse_trained_on
from derm_accel.data.transforms import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    BatchNormalize,
    decode_size,
    eval_input,
    with_transform,
)
from derm_accel.evaluation.inference import predict_logits
from derm_accel.evaluation.label_map import (
    LabelMapping,
    apply_label_map,
    load_label_map,
    map_labels,
    resolve_label_map,
)
from derm_accel.evaluation.members import member_metrics
from derm_accel.evaluation.outputs import FILES, ensemble_block, out_of_domain_block, write_outputs
from derm_accel.evaluation.subgroups import check_columns, parse_subgroups
from derm_accel.guard.model import load_guard
from derm_accel.models.build import data_config
from derm_accel.models.ensemble import (
    Ensemble,
    MemberLogits,
    check_not_trained_on,
    combine_members,
    display_name,
    expand_sources,
    load_models,
    split_members,
)
from derm_accel.models.load import resolve_model_source
from derm_accel.models.tta import resolve as resolve_tta

logger = logging.getLogger(__name__)


class LabelMismatchError(InputError):
    """The model's label names differ from the dataset's: scoring would silently misalign classes."""


def load_split(data: str | os.PathLike, split: str) -> tuple[Any, Any]:
    """The DatasetDict written by ``derm-accel convert`` and one of its splits, with clear errors."""
    from datasets import ClassLabel, DatasetDict

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"No dataset at {path}. Pass the folder written by `derm-accel convert`.")
    dataset = load_converted(path)
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


def label_mapping(
    label_map: str | os.PathLike | None, data_labels: list[str], model_labels: list[str]
) -> LabelMapping | None:
    """The --label-map file's mapping; without one, a dataset holding some of the model's classes (an external
    set rarely holds them all) is matched by name, the others simply without images. None: the same classes."""
    if label_map:
        return resolve_label_map(load_label_map(label_map), data_labels, model_labels)
    if set(data_labels) < set(model_labels):
        return dataclasses.replace(resolve_label_map({}, data_labels, model_labels), by_name=True)
    return None


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

    return Path("reports") / fit_name(name, f"-{split}")


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
    shown = sources[0] if len(sources) == 1 else f"ensemble of {len(sources)}: {names}"  # report.md's model
    report_dir = Path(out_dir)
    net, model_labels = load_models(sources)
    guard = load_guard(resolve_model_source(sources[0]))  # an ensemble answers with its first member's guard
    members = net.member_names if isinstance(net, Ensemble) else None
    tta = resolve_tta(tta, net)  # None: the model's own (config.json derm_accel.tta); "none": single view
    dataset, raw_split = load_split(data, split)
    # any model (one, several, an ensemble folder's members) trained on an image of this split is refused by name
    refuse_trained_on([(display_name(s), resolve_model_source(s)) for s in sources], raw_split, data, split)
    data_labels = list(raw_split.features[LABEL_COLUMN].names)
    mapping = label_mapping(label_map, data_labels, model_labels)
    if mapping is None:
        check_label_names(model_labels, data_labels, shown, data)
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
    # One pass over the split: logits of every view (and member) and, with a guard, its features.
    result = predict_logits(
        scored_net,
        with_transform(raw_split, transform, min_size=min_size, decode=decode),
        accelerator,
        guard_dim=None if guard is None else guard.max_dim,
        **infer,
    )
    member_rows = None
    if members:  # one pass gave every member's logits: score each, then average them into the ensemble
        per_member = split_members(result.logits, len(members))
        if mapping is None or not mapping.unknown:  # every image scored: each member too, in the model's indices
            labels = result.labels if mapping is None else torch.tensor(mapping.target)[result.labels]
            member_rows = member_metrics(per_member, labels.numpy(), members)
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
            sources, result, ood or [], report_dir / FILES["risk_coverage"], device=str(accelerator.device), tta=tta
        )
        metrics = write_outputs(
            ood_block=ood_block,
            model=shown,
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


