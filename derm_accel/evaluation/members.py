"""Scores of each member of an ensemble beside the ensemble's, for evaluate's report and the model card.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from derm_accel.evaluation.cv_stats import classification_metrics


def member_metrics(member_logits: torch.Tensor, labels: Any, names: list[str]) -> list[dict[str, Any]]:
    """Accuracy, balanced accuracy and macro-F1 of each member from ``[N, views, members, classes]`` logits,
    averaged as the evaluation report averages them (macro-F1 over the classes present in the split)."""
    labels = np.asarray(labels)
    rows = []
    for i, name in enumerate(names):
        predicted = member_logits[:, :, i].float().softmax(-1).mean(1).argmax(-1).numpy()
        rows.append({"model": name, **classification_metrics(labels, predicted)})
    return rows
