"""Test-time augmentation a model answers with: the original image plus its horizontal and vertical flips.

A skin lesion has no up or down, so the flipped images are as valid as the original; averaging the softmax over
the three views gained 0.04-0.06 macro-F1 on every cross-validation fold of derm-sample (docs/recipes.md). A
recipe's ``model.tta: flip`` is recorded in the exported ``config.json`` under ``derm_accel.tta``; evaluate,
predict, serve and the demo then use it by default (``--tta none`` turns it off), and reports say which was used.
Plain timm loading sees only the weights, i.e. the single view.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where tensors are touched: the model card reads declared_tta without it
    import torch

CONFIG_KEY = "derm_accel"
METHODS = ("flip",)
OFF = "none"


def declared_tta(config: dict[str, Any]) -> str | None:
    """The TTA a model's ``config.json`` declares (None when it declares none or one this version lacks)."""
    method = (config.get(CONFIG_KEY) or {}).get("tta")
    return method if method in METHODS else None


def resolve(requested: str | None, net: Any) -> str | None:
    """``requested`` ("flip", "none" or None for the model's own default) -> the method to use, or None."""
    if requested == OFF:
        return None
    if requested is None:
        return getattr(net, "default_tta", None)
    if requested not in METHODS:
        raise ValueError(f"Unknown test-time augmentation {requested!r}; choose one of {[*METHODS, OFF]}.")
    return requested


def flip_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The flipped views of a batch (the original is scored by the caller)."""
    return [x.flip(-1), x.flip(-2)]


def answer_logits(net: Any, x: torch.Tensor, logits: torch.Tensor, tta: str | None) -> torch.Tensor:
    """The logits a model answers with for batch ``x`` whose original view gave ``logits``: with ``tta="flip"``,
    the log of the softmax averaged over the original and both flips (its softmax is that average)."""
    if tta != "flip":
        return logits
    import torch  # heavy: only where tensors are touched (see the module's TYPE_CHECKING note)

    return combine(torch.stack([logits, *(net(v) for v in flip_views(x))], dim=1))


def combine(member_logits: torch.Tensor) -> torch.Tensor:
    """log of the mean of the members' softmax (dim 1), in float32: ``softmax(combine(l)) == mean softmax(l)``."""
    log_probs = member_logits.float().log_softmax(dim=-1)
    return log_probs.logsumexp(dim=1) - math.log(member_logits.shape[1])
