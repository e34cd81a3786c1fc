"""Scores of each member of an ensemble beside the ensemble's, for evaluate's report and the model card.
"""

from __future__ import annotations

from typing import Any

import torch


def member_metrics(member_logits: torch.Tensor, labels: Any, names: list[str]) -> list[dict[str, Any]]:
    """Accuracy, balanced accuracy and macro-F1 of each member from ``[N, views, members, classes]`` logits,
    averaged as the evaluation report averages them (macro-F1 over the classes present in the split)."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, f1_score

    labels = np.asarray(labels)
    rows, present = [], np.unique(labels)
    for i, name in enumerate(names):
        predicted = member_logits[:, :, i].float().softmax(-1).mean(1).argmax(-1).numpy()
        f1 = f1_score(labels, predicted, labels=present, average="macro", zero_division=0)
        rows.append(
            {
                "model": name,
                "accuracy": float((predicted == labels).mean()),
                "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
                "macro_f1": float(f1),
            }
        )
    return rows

