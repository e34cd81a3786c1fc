"""Fit a domain guard and a selective-prediction threshold for a trained model.

* Gaussians: one per depth on the training split's feature summaries, covariance with Ledoit-Wolf shrinkage.
* z-scores: each depth's squared distances are standardised with *held-out* in-domain distances, from
  cross-fitting the training split (each fold scored by Gaussians fitted on the other folds), so no depth
  dominates and in-sample optimism does not shrink the scale.
* ``ood_score`` threshold: the ``in_domain_share`` quantile of in-domain scores the Gaussians did not see —
  the cross-fitted training images plus the validation split — so it rests on hundreds of images, not on a
  small validation split alone.
* Selective prediction: on the validation split, the lowest top-1 probability such that the error rate among
  the images answered stays at or under ``target_error`` (the risk-coverage curve it came from is kept).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import KFold

from derm_accel.core.device import default_device
from derm_accel.guard.model import DomainGuard, GuardError, save_guard
from derm_accel.guard.scoring import Scored, risk_coverage, score_batches, split_batches
from derm_accel.models.build import data_config
from derm_accel.models.load import load_model

CROSS_FIT_FOLDS = 5
MIN_FIT_IMAGES = 20
MIN_ANSWERED = 10  # when the target error is out of reach, the fallback threshold still answers this many


def fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) with Ledoit-Wolf shrinkage: well conditioned even when dims approach the sample size."""
    lw = LedoitWolf(assume_centered=False).fit(x.astype(np.float64))
    return lw.location_, lw.precision_


def _sq_distances(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x.astype(np.float64) - mean
    return np.einsum("ij,jk,ik->i", d, precision, d)


def cross_fitted_distances(features: list[np.ndarray], folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> np.ndarray:
    """(N, L) squared distances of each image to Gaussians fitted without it (K-fold cross-fitting)."""
    n = len(features[0])
    out = np.zeros((n, len(features)))
    for fit_idx, held_idx in KFold(n_splits=min(folds, n), shuffle=True, random_state=seed).split(np.arange(n)):
        for depth, x in enumerate(features):
            mean, precision = fit_gaussian(x[fit_idx])
            out[held_idx, depth] = _sq_distances(x[held_idx], mean, precision)
    return out


def selective_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> dict[str, Any]:
    """The lowest confidence threshold whose answered images have an error rate <= ``target_error``.

    If no threshold reaches the target, the one with the lowest error among those answering at least
    ``MIN_ANSWERED`` images is kept and ``target_met`` is False.
    """
    curve = risk_coverage(confidence, correct)
    conf, risk = curve["confidence"], curve["risk"]
    # Only cut between distinct confidences: tied images are answered or refused together.
    cut = np.r_[conf[1:] < conf[:-1], True]
    candidates = np.flatnonzero(cut & (risk <= target_error))
    met = len(candidates) > 0
    if met:
        last = candidates[-1]
    else:  # the lowest error among cuts answering enough images for that error to mean something
        enough = np.flatnonzero(cut & (np.arange(1, len(conf) + 1) >= min(MIN_ANSWERED, len(conf))))
        last = int(enough[np.argmin(risk[enough])])
    return {
        "confidence_threshold": float(conf[last]),
        "target_error": target_error,
        "target_met": bool(met),
        "validation_coverage": float((last + 1) / len(conf)),
        "validation_risk": float(risk[last]),
        "validation_images": len(conf),
    }


def fit_guard(
    train: Scored, val: Scored, *, in_domain_share: float = 0.95, target_error: float = 0.10
) -> tuple[DomainGuard, dict[str, Any]]:
    """A guard from the training split's features, thresholds from held-out in-domain images."""
    if not 0.5 <= in_domain_share < 1.0:
        raise GuardError(f"in_domain_share must be in [0.5, 1), got {in_domain_share}")
    if len(train.logits) < MIN_FIT_IMAGES:
        raise GuardError(f"a domain guard needs at least {MIN_FIT_IMAGES} training images, got {len(train.logits)}")
    feats = [f.numpy() for f in train.features]
    held = cross_fitted_distances(feats)
    z_mean, z_std = held.mean(0), np.maximum(held.std(0), 1e-6)
    fitted = [fit_gaussian(x) for x in feats]
    guard = DomainGuard(
        means=[torch.from_numpy(m).float() for m, _ in fitted],
        precisions=[torch.from_numpy(p).float() for _, p in fitted],
        z_mean=torch.from_numpy(z_mean).float(),
        z_std=torch.from_numpy(z_std).float(),
        threshold=math.inf,
    )
    held_scores = ((held - z_mean) / z_std).sum(1)
    val_scores = guard.score(val.features).numpy()
    pooled = np.concatenate([held_scores, val_scores])
    guard.threshold = float(np.quantile(pooled, in_domain_share))
    correct = val.logits.argmax(-1).numpy() == val.labels.numpy()
    selective = selective_threshold(val.confidence, correct, target_error)
    guard.confidence_threshold = selective.pop("confidence_threshold")
    guard.settings = {
        "domain_guard": {
            "score": "sum over depths of z-scored squared Mahalanobis distances (Ledoit-Wolf covariance)",
            "features": "per-channel mean and std of each forward_intermediates map, plus pre-logits",
            "in_domain_share": in_domain_share,
            "fit_images": len(train.logits),
            "threshold_images": len(pooled),
            "validation_flagged": float((val_scores > guard.threshold).mean()),
        },
        "selective_prediction": selective,
    }
    diagnostics = {"validation_ood_scores": val_scores, "cross_fitted_train_scores": held_scores}
    return guard, diagnostics


def fit_model_guard(
    model_dir: str | Path,
    data: str | Path,
    *,
    train_split: str = "train",
    val_split: str = "validation",
    in_domain_share: float = 0.95,
    target_error: float = 0.10,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Fit (or refit) the guard of a local model folder on a converted dataset; return its config section."""
    from datasets import load_from_disk

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json); pass RUN/best")
    if not (Path(data) / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{data} is not a dataset written by `derm-accel convert` (no dataset_dict.json)")
    dataset = load_from_disk(str(data))
    for name in (train_split, val_split):
        if name not in dataset:
            raise GuardError(f"{data} has no '{name}' split (it has {sorted(dataset)})")
    device = device or default_device()
    net, labels = load_model(f"local-dir:{model_dir.resolve()}", device=device)
    data_labels = list(dataset[train_split].features["label"].names)
    if data_labels != labels:
        raise GuardError(f"{data}'s classes {data_labels} are not the model's {labels}; fit on the training data")
    cfg = data_config(net)
    train = score_batches(net, split_batches(dataset[train_split], cfg, batch_size=batch_size,
                                             num_workers=num_workers), device)
    val = score_batches(net, split_batches(dataset[val_split], cfg, batch_size=batch_size,
                                           num_workers=num_workers), device, tta=getattr(net, "default_tta", None))
    guard, _ = fit_guard(train, val, in_domain_share=in_domain_share, target_error=target_error)
    guard.settings["domain_guard"]["fit_split"] = train_split
    guard.settings["selective_prediction"]["fit_split"] = val_split
    save_guard(guard, model_dir)
    return json.loads(json.dumps(guard.config()))
