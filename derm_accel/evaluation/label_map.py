"""External validation: score a model on a dataset whose class names differ from the model's.

A label map (YAML or JSON) maps each dataset class onto a model class (``BCC: basal_cell_carcinoma``);
``null`` or no entry (for a name the model does not know) marks a class the model cannot predict. Images of
such classes are reported apart (count, what the model called them) and never scored as errors of the known
classes.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from derm_accel.core.escape import csv_writer, md_text
from derm_accel.evaluation.calibration import tta_probabilities
from derm_accel.evaluation.inference import InferenceResult

UNSCORED_FILE = "predictions_unscored.csv"


def load_label_map(path: str | Path) -> dict[str, str | None]:
    """dataset class -> model class (or None) from a YAML/JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Label map {path} not found; pass a YAML or JSON file of dataset_class: model_class.")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"Label map {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if not isinstance(raw, dict) or not all(v is None or isinstance(v, str) for v in raw.values()):
        raise ValueError(f"{path} must map dataset class names to model class names (or null for unknown).")
    return {str(k): v for k, v in raw.items()}


@dataclass
class LabelMapping:
    """``target[i]``: the model class index of dataset class i, or -1 when the model does not know it."""

    data_labels: list[str]
    model_labels: list[str]
    target: list[int]
    by_name: bool = False  # no label map: the dataset's classes are some of the model's, matched by name

    @property
    def unknown(self) -> list[str]:
        return [n for n, t in zip(self.data_labels, self.target, strict=True) if t < 0]

    def as_dict(self) -> dict[str, str | None]:
        return {
            n: (self.model_labels[t] if t >= 0 else None) for n, t in zip(self.data_labels, self.target, strict=True)
        }


def resolve_label_map(
    mapping: Mapping[str, str | None], data_labels: Sequence[str], model_labels: Sequence[str]
) -> LabelMapping:
    """Check the map against both label sets; unlisted dataset classes map to a model class of the same name."""
    typos = sorted(set(mapping) - set(data_labels))
    if typos:
        raise ValueError(
            f"Label map names classes that are not in the dataset: {typos}. Dataset classes: {list(data_labels)}."
        )
    wrong = sorted({v for v in mapping.values() if v is not None} - set(model_labels))
    if wrong:
        raise ValueError(f"Label map targets {wrong} are not model classes. Model classes: {list(model_labels)}.")
    index = {n: i for i, n in enumerate(model_labels)}
    target = [index.get(mapping[n], -1) if n in mapping else index.get(n, -1) for n in data_labels]
    if all(t < 0 for t in target):
        raise ValueError(
            f"No dataset class maps onto a model class (dataset: {list(data_labels)}; model: {list(model_labels)}); "
            "write the mapping in the --label-map file."
        )
    return LabelMapping(list(data_labels), list(model_labels), target)


@dataclass
class External:
    """The images of classes the model does not know, set apart from the scored ones."""

    mapping: LabelMapping
    sources: list[str]
    data_labels: np.ndarray  # dataset class index of each unscored image
    logits: torch.Tensor  # (N, V, C)

    def summary(self, scored: int, temperature: float = 1.0) -> dict[str, Any]:
        probs = tta_probabilities(self.logits, temperature).numpy() if len(self.sources) else np.zeros((0, 1))
        predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        unknown: dict[str, Any] = {}
        for c, name in enumerate(self.mapping.data_labels):
            rows = np.flatnonzero(self.data_labels == c)
            if self.mapping.target[c] >= 0 or not len(rows):
                continue
            called = Counter(self.mapping.model_labels[p] for p in predicted[rows].tolist())
            unknown[name] = {
                "n": len(rows),
                "predicted_as": dict(called.most_common()),
                "mean_top_probability": float(probs[rows].max(axis=1).mean()),
            }
        held = set(self.mapping.target)
        return {
            "label_map": self.mapping.as_dict(),
            "matched_by_name": self.mapping.by_name,
            "model_classes_without_images": [n for i, n in enumerate(self.mapping.model_labels) if i not in held],
            "scored_images": scored,
            "unscored_images": len(self.sources),
            "unknown_classes": unknown,
            "unscored_file": UNSCORED_FILE,
        }

    def write(self, path: str | Path, temperature: float = 1.0) -> Path:
        """One row per unscored image: its dataset label, what the model said, every class probability."""
        probs = tta_probabilities(self.logits, temperature).numpy() if len(self.sources) else np.zeros((0, 0))
        names = self.mapping.model_labels
        with Path(path).open("w", newline="") as f:
            writer = csv_writer(f)
            writer.writerow(("source_path", "dataset_label", "predicted_label", *names))
            for src, y, p in zip(self.sources, self.data_labels.tolist(), probs, strict=True):
                writer.writerow((src, self.mapping.data_labels[y], names[int(p.argmax())], *(f"{v:.9g}" for v in p)))
        return Path(path)


def apply_label_map(
    result: InferenceResult, split: Any, mapping: LabelMapping
) -> tuple[InferenceResult, Any, External]:
    """Keep the images of known classes (labels re-indexed to the model's); set the others apart."""
    target = torch.tensor(mapping.target, dtype=torch.long)
    mapped = target[result.labels]
    known = torch.nonzero(mapped >= 0).flatten()
    unknown = torch.nonzero(mapped < 0).flatten()
    sources = split["source_path"] if "source_path" in split.column_names else [str(i) for i in range(len(split))]
    external = External(
        mapping=mapping,
        sources=[sources[i] for i in unknown.tolist()],
        data_labels=result.labels[unknown].numpy(),
        logits=result.logits[unknown],
    )
    scored = dataclasses.replace(result.rows(known), labels=mapped[known])
    return scored, split.select(known.tolist()), external


def map_labels(result: InferenceResult, mapping: LabelMapping) -> InferenceResult:
    """A validation result (for temperature fitting) restricted to known classes, in the model's indices."""
    mapped = torch.tensor(mapping.target, dtype=torch.long)[result.labels]
    keep = mapped >= 0
    return dataclasses.replace(result.rows(keep), labels=mapped[keep])


def report_lines(metrics: Mapping[str, Any]) -> list[str]:
    """report.md section for an external validation (empty without --label-map)."""
    ext = metrics.get("external_validation")
    if not ext:
        return []
    mapped = [f"{md_text(k)} → {md_text(v)}" for k, v in ext["label_map"].items() if v is not None and k != v]
    absent = ext.get("model_classes_without_images") or []
    if ext.get("matched_by_name"):
        how = (
            f"The dataset holds {len(ext['label_map'])} of the model's {len(ext['label_map']) + len(absent)} "
            "classes, matched by name (no label map needed)"
        )
    else:
        how = "Dataset classes were mapped onto the model's with a label map" + (
            f" ({', '.join(mapped)}; other names matched as they are)" if mapped else ""
        )
    lines = [
        "## External validation: class mapping",
        "",
        how + f". {ext['scored_images']} images of known classes are scored above; {ext['unscored_images']} images "
        "of classes the model does not know are **not scored** (they are neither errors of the known classes "
        "nor counted in any metric above).",
        "",
    ]
    if absent:
        lines += [
            f"Model classes without images in this dataset: {', '.join(map(md_text, absent))}. They have no "
            "support: no recall or F1 of their own and no part in the macro averages; a prediction of one of "
            "them still counts as an error.",
            "",
        ]
    if ext["unknown_classes"]:
        lines += [
            "| dataset class (unknown to the model) | images | mostly called | mean top probability |",
            "|---|---:|---|---:|",
        ]
        for name, u in ext["unknown_classes"].items():
            top = ", ".join(f"{md_text(k)} ({v})" for k, v in list(u["predicted_as"].items())[:3])
            lines.append(f"| {md_text(name)} | {u['n']} | {top} | {u['mean_top_probability']:.3f} |")
        lines += ["", f"Each of these images is listed in `{ext['unscored_file']}`.", ""]
    return lines
