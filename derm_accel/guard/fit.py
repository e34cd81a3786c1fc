"""Fit a domain guard and a selective-prediction threshold for a trained model.

* Sample: at most ``max_fit_images`` training images (seeded, class-stratified), chosen before any image is
  scored, so the fit's memory does not grow with the training split.
* Gaussians: one per depth on the sample's feature summaries, covariance with Ledoit-Wolf shrinkage.
* z-scores: each depth's squared distances are standardised with cross-fitted distances of the sample (each
  fold scored by Gaussians fitted on the other folds), so no depth dominates.
* ``ood_score`` threshold: split-conformal on the validation split, images that played no part in fitting the
  network or the Gaussians: the k-th smallest of their n scores, with k chosen so that at least
  ``in_domain_share`` of new images of the same collection pass with 90% confidence over the draw of the
  validation images (:func:`conformal_rank`; k/(n + 1) of them pass on average). Training images cannot
  set it: the network was fitted on them, so even cross-fitted they score lower than new images do (their
  flagged share is recorded as ``training_flagged`` to show by how much).
* Selective prediction, on the validation split: by default answer the ``target_coverage`` most confident share
  (the lowest top-1 probability that does); with ``target_error``, the lowest top-1 probability at which the
  error among answered images stays at or under it (the risk-coverage curve it came from is kept).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binom
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import KFold

from derm_accel.core.device import default_device
from derm_accel.data.selection import is_converted, load_converted
from derm_accel.guard.model import DomainGuard, GuardError, save_guard
from derm_accel.guard.scoring import Scored, risk_coverage, score_batches, split_batches
from derm_accel.models.build import data_config
from derm_accel.models.load import load_model

CROSS_FIT_FOLDS = 5
MIN_FIT_IMAGES = 20
MIN_ANSWERED = 10  # when the target error is out of reach, the fallback threshold still answers this many
MAX_FIT_IMAGES = 5000  # default sample the Gaussians are fitted on (recipe key guard.max_fit_images)
TARGET_COVERAGE = 0.8  # default share of in-domain validation images the model answers
THRESHOLD_CONFIDENCE = 0.9  # the ood_score threshold lets in_domain_share pass with this confidence


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


def stratified_sample(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ~``size`` rows, each class in proportion to its count (at least one row each),
    chosen with ``numpy.random.default_rng(seed)``; every row when there are no more than ``size``."""
    labels = np.asarray(labels)
    if len(labels) <= size:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * size / len(labels)
    quota = np.maximum(np.floor(share).astype(int), 1)
    left = size - quota.sum()
    if left > 0:  # largest remainders first (ties: the smaller class index)
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        quota[order[:left]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picked))


def conformal_rank(n: int, share: float, confidence: float = THRESHOLD_CONFIDENCE) -> tuple[int, bool]:
    """The rank k (1-based) of the threshold among n held-out scores, and whether ``confidence`` is reached.

    A new exchangeable image passes the k-th smallest score with probability F(s_(k)) ~ Beta(k, n + 1 - k),
    so P(pass rate < share) = P(Binomial(n, share) >= k). The smallest k that makes this at most
    1 - ``confidence`` lets at least ``share`` of new images pass with that confidence over the draw of the
    held-out images; plain split-conformal, ceil((n + 1) * share), only on average. Too few images for it:
    the largest score, and False.
    """
    start = max(1, math.ceil((n + 1) * share))
    ranks = np.arange(start, n + 1)
    ok = binom.sf(ranks - 1, n, share) <= 1 - confidence
    return (int(ranks[np.argmax(ok)]), True) if ok.any() else (n, False)


def conformal_threshold(scores: np.ndarray, share: float, confidence: float = THRESHOLD_CONFIDENCE) -> float:
    """The :func:`conformal_rank`-th smallest of n held-out scores."""
    ordered = np.sort(np.asarray(scores, dtype=float))
    return float(ordered[conformal_rank(len(ordered), share, confidence)[0] - 1])


def selective_threshold(
    confidence: np.ndarray,
    correct: np.ndarray,
    target_error: float | None = None,
    target_coverage: float = TARGET_COVERAGE,
) -> dict[str, Any]:
    """The confidence threshold of the abstention rule, from validation images.

    With ``target_error`` None (the default policy): the highest threshold that answers at least
    ``target_coverage`` of the images. With ``target_error``: the lowest threshold whose answered images have an
    error rate <= ``target_error``; if none reaches it, the one with the lowest error among those answering at
    least ``MIN_ANSWERED`` images, and ``target_met`` is False.
    """
    curve = risk_coverage(confidence, correct)
    conf, risk = curve["confidence"], curve["risk"]
    n = len(conf)
    # Only cut between distinct confidences: tied images are answered or refused together.
    cut = np.r_[conf[1:] < conf[:-1], True]
    if target_error is None:
        last = int(np.flatnonzero(cut & (np.arange(1, n + 1) >= target_coverage * n - 1e-9))[0])
        met = True
        policy = {"policy": "coverage", "target_coverage": target_coverage}
    else:
        candidates = np.flatnonzero(cut & (risk <= target_error))
        met = len(candidates) > 0
        if met:
            last = int(candidates[-1])
        else:  # the lowest error among cuts answering enough images for that error to mean something
            enough = np.flatnonzero(cut & (np.arange(1, n + 1) >= min(MIN_ANSWERED, n)))
            last = int(enough[np.argmin(risk[enough])])
        policy = {"policy": "error", "target_error": target_error}
    return {
        "confidence_threshold": float(conf[last]),
        **policy,
        "target_met": bool(met),
        "validation_coverage": float((last + 1) / n),
        "validation_risk": float(risk[last]),
        "validation_error_all": float(risk[-1]),
        "validation_images": n,
    }


def check_settings(in_domain_share: float, target_error: float | None, target_coverage: float) -> None:
    """Refuse threshold settings out of range, naming the setting."""
    if not 0.5 <= in_domain_share < 1.0:
        raise GuardError(f"in_domain_share must be in [0.5, 1), got {in_domain_share}")
    if not 0 < target_coverage <= 1:
        raise GuardError(f"target_coverage must be in (0, 1], got {target_coverage}")
    if target_error is not None and not 0 < target_error < 1:
        raise GuardError(f"target_error must be in (0, 1) or None, got {target_error}")


def fit_domain_guard(train: Scored) -> tuple[DomainGuard, np.ndarray]:
    """Gaussians and z-score statistics from training features; the threshold is left for :func:`calibrate`.

    Also returns the cross-fitted training scores (diagnostics: how much lower than new images they score)."""
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
    return guard, ((held - z_mean) / z_std).sum(1)


def calibrate(
    guard: DomainGuard,
    val_scores: np.ndarray,
    confidence: np.ndarray,
    correct: np.ndarray,
    *,
    in_domain_share: float = 0.95,
    target_error: float | None = None,
    target_coverage: float = TARGET_COVERAGE,
    train_scores: np.ndarray | None = None,
    fit_images: int | None = None,
) -> DomainGuard:
    """Set both thresholds from held-out validation images and record how they were set."""
    check_settings(in_domain_share, target_error, target_coverage)
    if len(val_scores) == 0:
        raise GuardError("the validation split is empty: the guard's thresholds need held-out in-domain images")
    rank, confident = conformal_rank(len(val_scores), in_domain_share)
    guard.threshold = float(np.sort(np.asarray(val_scores, dtype=float))[rank - 1])
    selective = selective_threshold(confidence, correct, target_error, target_coverage)
    guard.confidence_threshold = selective.pop("confidence_threshold")
    domain: dict[str, Any] = {
        "score": "sum over depths of z-scored squared Mahalanobis distances (Ledoit-Wolf covariance)",
        "features": "per-channel mean and std of each forward_intermediates map, plus pre-logits",
        "in_domain_share": in_domain_share,
        "fit_images": fit_images,
        "threshold_rule": f"split-conformal on the validation split: the k-th smallest ood_score of its n images, "
        f"k the smallest rank that lets in_domain_share of new images pass with {THRESHOLD_CONFIDENCE:.0%} "
        "confidence",
        "threshold_images": len(val_scores),
        "threshold_rank": rank,
        "threshold_confidence_met": confident,
        "validation_flagged": float((np.asarray(val_scores) > guard.threshold).mean()),
    }
    if train_scores is not None:
        domain["training_flagged"] = float((train_scores > guard.threshold).mean())
    guard.settings = {"domain_guard": domain, "selective_prediction": selective}
    return guard


def fit_guard(
    train: Scored,
    val: Scored,
    *,
    in_domain_share: float = 0.95,
    target_error: float | None = None,
    target_coverage: float = TARGET_COVERAGE,
) -> tuple[DomainGuard, dict[str, Any]]:
    """A guard from the training features, thresholds from held-out validation images (features or scores)."""
    check_settings(in_domain_share, target_error, target_coverage)
    guard, train_scores = fit_domain_guard(train)
    val_scores = val.ood_scores.numpy() if val.ood_scores is not None else guard.score(val.features).numpy()
    correct = val.logits.argmax(-1).numpy() == val.labels.numpy()
    calibrate(
        guard, val_scores, val.confidence, correct, in_domain_share=in_domain_share, target_error=target_error,
        target_coverage=target_coverage, train_scores=train_scores, fit_images=len(train.logits),
    )
    diagnostics = {"validation_ood_scores": val_scores, "cross_fitted_train_scores": train_scores}
    return guard, diagnostics


def fit_model_guard(
    model_dir: str | Path,
    data: str | Path,
    *,
    train_split: str = "train",
    val_split: str = "validation",
    in_domain_share: float = 0.95,
    target_error: float | None = None,
    target_coverage: float = TARGET_COVERAGE,
    max_fit_images: int = MAX_FIT_IMAGES,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Fit (or refit) the guard of a local model folder on a converted dataset; return its config section.

    Only a class-stratified sample of at most ``max_fit_images`` training images is decoded and scored; the
    validation split is scored batch by batch into guard scores and logits, its features never kept.
    """
    if max_fit_images < MIN_FIT_IMAGES:
        raise GuardError(f"max_fit_images must be at least {MIN_FIT_IMAGES}, got {max_fit_images}")
    check_settings(in_domain_share, target_error, target_coverage)  # before any image is scored
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json); pass RUN/best")
    if not is_converted(data):
        raise FileNotFoundError(f"{data} is not a dataset written by `derm-accel convert` (no dataset_dict.json)")
    dataset = load_converted(data)  # or a k-fold index selection of one
    for name in (train_split, val_split):
        if name not in dataset:
            raise GuardError(f"{data} has no '{name}' split (it has {sorted(dataset)})")
    device = device or default_device()
    net, labels = load_model(f"local-dir:{model_dir.resolve()}", device=device)
    data_labels = list(dataset[train_split].features["label"].names)
    if data_labels != labels:
        raise GuardError(f"{data}'s classes {data_labels} are not the model's {labels}; fit on the training data")
    cfg = data_config(net)
    train_rows = dataset[train_split]
    sample = stratified_sample(np.asarray(train_rows["label"]), max_fit_images, seed)
    train = score_batches(net, split_batches(train_rows.select(sample), cfg, batch_size=batch_size,
                                             num_workers=num_workers), device)
    guard, train_scores = fit_domain_guard(train)
    del train  # the sample's features: the only ones ever held
    val = score_batches(net, split_batches(dataset[val_split], cfg, batch_size=batch_size, num_workers=num_workers),
                        device, tta=getattr(net, "default_tta", None), guard=guard.to(device))
    correct = val.logits.argmax(-1).numpy() == val.labels.numpy()
    calibrate(
        guard, val.ood_scores.numpy(), val.confidence, correct, in_domain_share=in_domain_share,
        target_error=target_error, target_coverage=target_coverage, train_scores=train_scores,
        fit_images=len(sample),
    )
    guard.settings["domain_guard"].update(
        fit_split=train_split, fit_sample={"images": len(sample), "of": len(train_rows), "max_fit_images":
                                           max_fit_images, "seed": seed, "stratified_by": "label"},
        calibration_split=val_split,
    )
    guard.settings["selective_prediction"]["fit_split"] = val_split
    save_guard(guard, model_dir)
    return json.loads(json.dumps(guard.config()))
