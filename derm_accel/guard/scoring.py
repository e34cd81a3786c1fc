"""Scoring a split with a model and its guard: logits, guard scores and the risk-coverage curve of abstention.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from derm_accel.data import loaders
from derm_accel.data.transforms import BatchNormalize, decode_size, eval_input
from derm_accel.guard.model import GuardError
from derm_accel.models.features import MAX_DIM, forward_with_features
from derm_accel.models.tta import answer_logits


@dataclass
class Scored:
    """Logits (N, C), per-depth feature summaries [(N, D_i)] and labels (N,) of one set of images."""

    logits: torch.Tensor
    features: list[torch.Tensor]
    labels: torch.Tensor | None = None
    ood_scores: torch.Tensor | None = None  # (N,) the guard's scores, when scored with one (features dropped)

    @property
    def confidence(self) -> np.ndarray:
        return self.logits.float().softmax(-1).max(-1).values.numpy()

    @property
    def energy(self) -> np.ndarray:  # higher = less like the training data, like ood_score
        return (-torch.logsumexp(self.logits.float(), dim=-1)).numpy()



def score_batches(
    net: Any,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    device: str,
    max_dim: int = MAX_DIM,
    tta: str | None = None,
    guard: Any = None,
) -> Scored:
    """Run the model over (inputs, labels) batches; inputs already normalised float tensors.

    Features come from the original view; with ``tta="flip"`` the logits average the flipped views as the
    model's answers do (derm_accel.tta), so confidences and abstention thresholds match what predict answers.
    With a ``guard`` (a DomainGuard), each batch's features become its ``ood_scores`` and are dropped, so memory
    holds (N, C) logits and (N,) scores whatever the number of images.
    """
    net = net.to(device).eval()
    logits, feats, labels, scores = [], [], [], []
    with torch.inference_mode():
        for x, y in batches:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            out, summaries = forward_with_features(net, x, max_dim)
            out = answer_logits(net, x, out, tta)
            logits.append(out.float().cpu())
            if guard is None:
                feats.append([f.cpu() for f in summaries])
            else:
                scores.append(guard.score(summaries).float().cpu())
            if y is not None:
                labels.append(y.cpu())
    if not logits:
        raise GuardError("no images to score")
    depths = [torch.cat([f[i] for f in feats]) for i in range(len(feats[0]))] if feats else []
    return Scored(
        torch.cat(logits), depths, torch.cat(labels) if labels else None, torch.cat(scores) if scores else None
    )



def split_batches(split: Any, data_cfg: dict[str, Any], *, batch_size: int, num_workers: int = 0) -> Iterator:
    """(normalised inputs, labels) batches of a converted split, preprocessed exactly as evaluate does."""
    transform, decode = eval_input(data_cfg)
    min_size = decode_size(tuple(data_cfg["input_size"][-2:]), data_cfg.get("crop_pct"))
    loader = loaders.eval_loader(
        split, transform, batch_size=batch_size, min_size=min_size, decode=decode, num_workers=num_workers
    )
    normalize = BatchNormalize(data_cfg)
    for batch in loader:
        yield normalize(batch["pixel_values"]), batch.get("labels")



def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Coverage and risk when answering the most confident first; AURC is the mean risk over coverages.

    Images with the same confidence are answered or refused together, so within a run of tied confidences the
    risk is the expected one when the tie is broken at random (each tied image counts the run's mean error):
    the curve and AURC do not depend on the order of the input.
    """
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    wrong = 1.0 - correct[order].astype(float)
    n = len(wrong)
    if n:  # replace each tied run's errors by their mean
        starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])
        run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
        wrong = (np.bincount(run, weights=wrong) / np.bincount(run))[run]
    risk = np.cumsum(wrong) / np.arange(1, n + 1)
    coverage = np.arange(1, n + 1) / n
    return {"confidence": conf, "coverage": coverage, "risk": risk, "aurc": float(risk.mean()) if n else float("nan")}


def operating_points(
    confidence: np.ndarray, correct: np.ndarray, coverages: tuple[float, ...] = (1.0, 0.8, 0.5)
) -> list[dict[str, float]]:
    """Points of the risk-coverage curve: answering the ``coverage`` most confident share, the error among those
    answered (tie-aware, as :func:`risk_coverage`) and the top-1 probability it answers from."""
    curve = risk_coverage(confidence, correct)
    n = len(curve["risk"])
    points = []
    for coverage in coverages:
        i = min(max(int(np.ceil(coverage * n)) - 1, 0), n - 1)
        points.append({
            "coverage": float(curve["coverage"][i]),
            "risk": float(curve["risk"][i]),
            "confidence_threshold": float(curve["confidence"][i]),
        })
    return points
