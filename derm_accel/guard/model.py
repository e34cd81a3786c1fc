"""The domain guard: one Gaussian per network depth, distances z-scored and summed into one ``ood_score``.

``ood_score`` is higher for images less like the training data. It is the sum over depths of the squared
Mahalanobis distance of the image's feature summary to the training images' mean, each z-scored with the
distances of in-domain images the Gaussians were not fitted on (cross-fitted training images). The guard is a
sibling file of the model, ``domain_guard.safetensors``, with its settings in ``config.json`` under the
``derm_accel`` key; plain timm ignores both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from derm_accel.core.errors import InputError
from derm_accel.models.features import MAX_DIM
from derm_accel.models.load import split_hub_id

GUARD_FILE = "domain_guard.safetensors"
CONFIG_KEY = "derm_accel"
FORMAT_VERSION = 1


class GuardError(InputError):
    """A domain guard file is missing, damaged or does not match its model."""


@dataclass
class DomainGuard:
    """Per-depth Gaussians (mean, precision), z-score statistics, and the decision thresholds."""

    means: list[torch.Tensor]
    precisions: list[torch.Tensor]
    z_mean: torch.Tensor  # (L,) mean of in-domain held-out squared distances per depth
    z_std: torch.Tensor  # (L,)
    threshold: float  # ood_score above this: out of domain
    confidence_threshold: float | None = None  # top-1 probability under this: abstain (selective prediction)
    settings: dict[str, Any] = field(default_factory=dict)
    max_dim: int = MAX_DIM  # width the feature summaries were pooled to when the guard was fitted

    def distances(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, L) squared Mahalanobis distances, one column per depth."""
        if len(features) != len(self.means):
            raise GuardError(f"the model gave {len(features)} feature depths but the guard has {len(self.means)}")
        cols = []
        for x, mu, prec in zip(features, self.means, self.precisions, strict=True):
            if x.shape[1] != mu.shape[0]:
                raise GuardError(f"feature width {x.shape[1]} does not match the guard's {mu.shape[0]}")
            d = x.float().to(mu.device) - mu
            cols.append(((d @ prec) * d).sum(-1))
        return torch.stack(cols, dim=1)

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B,) ood_score: z-scored distances summed over depths."""
        return ((self.distances(features) - self.z_mean) / self.z_std).sum(dim=1)

    def to(self, device: torch.device | str) -> DomainGuard:
        move = [t.to(device) for t in self.means], [t.to(device) for t in self.precisions]
        return DomainGuard(*move, self.z_mean.to(device), self.z_std.to(device), self.threshold,
                           self.confidence_threshold, dict(self.settings), self.max_dim)

    def config(self) -> dict[str, Any]:
        """What goes under ``config.json["derm_accel"]``."""
        return {
            "domain_guard": {
                "file": GUARD_FILE,
                "format_version": FORMAT_VERSION,
                "depths": len(self.means),
                "max_dim": self.max_dim,
                "threshold": self.threshold,
                **self.settings.get("domain_guard", {}),
            },
            "selective_prediction": {
                "confidence_threshold": self.confidence_threshold,
                **self.settings.get("selective_prediction", {}),
            },
        }


def save_guard(guard: DomainGuard, folder: str | Path) -> None:
    """Write ``domain_guard.safetensors`` and the settings into ``config.json`` (both replaced atomically)."""
    folder = Path(folder)
    tensors = {"z_mean": guard.z_mean.float().cpu(), "z_std": guard.z_std.float().cpu()}
    for i, (mu, prec) in enumerate(zip(guard.means, guard.precisions, strict=True)):
        tensors[f"depth{i}.mean"] = mu.float().cpu().contiguous()
        tensors[f"depth{i}.precision"] = prec.float().cpu().contiguous()
    tmp = folder / f".{GUARD_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config[CONFIG_KEY] = {**config.get(CONFIG_KEY, {}), **guard.config()}
    config_tmp = folder / ".config.json.tmp"
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(folder / GUARD_FILE)
    config_tmp.replace(config_path)


def guard_from_files(config: dict[str, Any], weights: str | Path) -> DomainGuard:
    """Rebuild a guard from a model's ``config.json`` dict and its guard file (read with safetensors only)."""
    settings = config.get(CONFIG_KEY) or {}
    guard_cfg = settings.get("domain_guard")
    if not guard_cfg:
        raise GuardError("config.json has no derm_accel.domain_guard settings")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise GuardError(
            f"{weights} is not a readable safetensors file ({exc}); refit it with `derm-accel guard`"
        ) from exc
    depths = int(guard_cfg["depths"])
    try:
        means = [tensors[f"depth{i}.mean"] for i in range(depths)]
        precisions = [tensors[f"depth{i}.precision"] for i in range(depths)]
        z_mean, z_std = tensors["z_mean"], tensors["z_std"]
    except KeyError as exc:
        raise GuardError(f"{weights} lacks tensor {exc}; refit it with `derm-accel guard`") from exc
    selective = settings.get("selective_prediction") or {}
    extra = {
        k: v for k, v in guard_cfg.items() if k not in ("file", "format_version", "depths", "threshold", "max_dim")
    }
    sel_extra = {k: v for k, v in selective.items() if k != "confidence_threshold"}
    return DomainGuard(
        means, precisions, z_mean, z_std, float(guard_cfg["threshold"]), selective.get("confidence_threshold"),
        {"domain_guard": extra, "selective_prediction": sel_extra},
        int(guard_cfg.get("max_dim", 768)),  # 768: guards written before the width was recorded
    )


def read_guard(folder: str | Path) -> DomainGuard | None:
    """The guard of a local model folder, or None when the model has none."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not (folder / GUARD_FILE).is_file() or not config_path.is_file():
        return None
    return guard_from_files(json.loads(config_path.read_text()), folder / GUARD_FILE)


def verdict(guard: DomainGuard | None, ood_score: float | None, confidence: float) -> dict[str, Any]:
    """The guard fields every prediction carries: ood_score, in_domain, abstain and the reason."""
    if guard is None or ood_score is None:
        return {"ood_score": None, "in_domain": None, "abstain": False, "reason": "this model has no domain guard"}
    in_domain = bool(np.isfinite(ood_score) and ood_score <= guard.threshold)
    if not in_domain:
        reason = (
            f"out of domain: ood_score {ood_score:.1f} is above the guard's threshold {guard.threshold:.1f}; this "
            f"image does not look like the images the model was trained on, so its answer is not meaningful"
        )
        return {"ood_score": float(ood_score), "in_domain": False, "abstain": True, "reason": reason}
    floor = guard.confidence_threshold
    if floor is not None and confidence < floor:
        reason = f"low confidence: top-1 probability {confidence:.2f} is under the abstention threshold {floor:.2f}"
        return {"ood_score": float(ood_score), "in_domain": True, "abstain": True, "reason": reason}
    return {"ood_score": float(ood_score), "in_domain": True, "abstain": False, "reason": None}


def load_guard(source: str) -> DomainGuard | None:
    """The guard beside a model: ``local-dir:PATH`` or ``hf-hub:ORG/NAME[@REV]`` (downloaded once, then cached).

    A Hub model published without a guard returns None; only safetensors are read.
    """
    if source.startswith("local-dir:"):
        return read_guard(source.removeprefix("local-dir:"))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, revision = split_hub_id(source)
    config_path = hf_hub_download(repo_id, "config.json", revision=revision)  # cached with the model
    config = json.loads(Path(config_path).read_text())
    if not (config.get(CONFIG_KEY) or {}).get("domain_guard"):
        return None  # published without a guard: predictions say so
    try:
        weights = hf_hub_download(repo_id, GUARD_FILE, revision=revision)
    except LocalEntryNotFoundError as exc:  # checked first: it is also an EntryNotFoundError
        raise GuardError(
            f"{repo_id}'s config.json declares a domain guard but {GUARD_FILE} is not in the local Hub cache and "
            f"the Hub cannot be reached; load the model once online, or pass --no-guard to predict without it"
        ) from exc
    except EntryNotFoundError as exc:
        raise GuardError(
            f"{repo_id}'s config.json declares a domain guard but the repo has no {GUARD_FILE}; re-push the model "
            f"folder with `derm-accel push`, or pass --no-guard to predict without it"
        ) from exc
    return guard_from_files(config, weights)
