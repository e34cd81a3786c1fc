"""Model soups: the uniform weight average of fold models, one timm model at a single model's inference cost.

Fold models fine-tuned from the same ImageNet weights often stay in one basin, so their average can match their
ensemble (Wortsman et al., 2022) -- or fall apart. Out-of-fold images cannot tell: every one of them was in the
training data of the other folds' models, hence of the soup. :func:`compare_on_split` therefore judges the soup on
a split that no member trained on (``train --folds K --holdout test``), beside each member and their ensemble;
``train`` keeps ``RUN/soup`` only where the soup's macro-F1 is at least the best member's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from derm_accel.data.trained_rows import write_merged_training_rows
from derm_accel.evaluation.cv_stats import classification_metrics
from derm_accel.evaluation.inference import score_split
from derm_accel.models.build import export_model
from derm_accel.models.ensemble import EnsembleError
from derm_accel.models.load import load_model, read_config

SOUP_INFO = "soup.json"
COPIED_FILES = ("recipe.yaml",)


def soup_state(member_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """The uniform average of the members' weights (float tensors; integer buffers from the first member)."""
    from safetensors.torch import load_file

    configs = [read_config(d) for d in member_dirs]
    for d, c in zip(member_dirs[1:], configs[1:], strict=True):
        if c.get("architecture") != configs[0].get("architecture") or c.get("num_classes") != configs[0].get(
            "num_classes"
        ):
            raise EnsembleError(
                f"{d} is a {c.get('architecture')} with {c.get('num_classes')} classes, {member_dirs[0]} a "
                f"{configs[0].get('architecture')} with {configs[0].get('num_classes')}: only one architecture "
                f"can be averaged into a soup."
            )
    states = [load_file(str(d / "model.safetensors")) for d in member_dirs]
    soup = {}
    for key, first in states[0].items():
        if any(key not in s or s[key].shape != first.shape for s in states[1:]):
            raise EnsembleError(f"weight {key} differs in name or shape between members; they cannot be averaged")
        if first.is_floating_point():
            soup[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
        else:
            soup[key] = first.clone()  # e.g. BatchNorm's num_batches_tracked
    return soup


def write_soup(member_dirs: list[Path], out: str | os.PathLike) -> Path:
    """``out``: a normal model folder (config.json + model.safetensors) holding the members' average."""
    net, labels = load_model(str(member_dirs[0]))
    net.load_state_dict(soup_state(member_dirs), strict=True)
    info = {"method": "uniform weight average", "members": [str(d) for d in member_dirs]}
    extra = {name: (member_dirs[0] / name).read_text() for name in COPIED_FILES if (member_dirs[0] / name).is_file()}
    folder = export_model(
        net,
        out,
        labels,
        extra_files={**extra, SOUP_INFO: json.dumps(info, indent=2) + "\n"},
        license=read_license(member_dirs[0]),
        tta=getattr(net, "default_tta", None),
        color_constancy=getattr(net, "color_constancy", None),
    )
    write_merged_training_rows(member_dirs, folder)  # the soup learnt from every member's images
    return folder


def read_license(model_dir: Path) -> str | None:
    return (read_config(model_dir).get("pretrained_cfg") or {}).get("license")


def compare_on_split(
    member_dirs: list[Path], soup_dir: Path, data: str | Path, split: str, *, tta: str | None = None
) -> dict[str, Any]:
    """Macro-F1, balanced accuracy and accuracy of each member, their ensemble and the soup on ``data[split]``.

    ``offered`` says whether the soup's macro-F1 is at least the best member's.
    """
    scores = [score_split(d, data, split, tta=tta) for d in member_dirs]
    soup = score_split(soup_dir, data, split, tta=tta)
    labels = scores[0]["labels"]

    def metrics(probabilities: np.ndarray) -> dict[str, float]:
        return classification_metrics(labels, probabilities.argmax(1))

    members = [{"model": str(d), **metrics(s["probabilities"])} for d, s in zip(member_dirs, scores, strict=True)]
    best = max(m["macro_f1"] for m in members)
    soup_metrics = metrics(soup["probabilities"])
    return {
        "split": split,
        "num_samples": len(labels),
        "tta": tta,
        "members": members,
        "ensemble": metrics(np.mean([s["probabilities"] for s in scores], axis=0)),
        "soup": soup_metrics,
        "best_member_macro_f1": best,
        "offered": soup_metrics["macro_f1"] >= best,
    }
