"""Network features for the domain guard: the logits and one summary vector per depth, from one forward pass.

Each depth's feature map is summarised by its per-channel mean and standard deviation over space (tokens for
ViTs), which keeps both "what" (mean activation) and "texture" (spread) of the image at that depth. timm's
``forward_intermediates`` gives these maps for CNNs and ViTs alike; the classifier then runs on the final
features of the same pass, so the guard costs no second forward. Models without ``forward_intermediates`` fall
back to their pre-logits features alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Larger summaries are average-pooled down to this size: the stored precision matrix and the cost of the
# Mahalanobis distance grow with its square (512 keeps the guard under 10% of the forward; docs/benchmarks.md).
MAX_DIM = 512


def summarize(feature: torch.Tensor, max_dim: int = MAX_DIM) -> torch.Tensor:
    """(B, C, H, W) or (B, N, C) maps -> (B, 2C) channel mean and std; (B, C) vectors pass through; float32."""
    feature = feature.float()
    if feature.ndim == 4:  # one fused pass over (H, W); channels_last maps are read in place
        var, mean = torch.var_mean(feature, dim=(2, 3), correction=0)
        parts = [mean, var.sqrt()]
    elif feature.ndim == 3:  # tokens (B, N, C)
        parts = [feature.mean(1), feature.std(1, correction=0)]
    elif feature.ndim == 2:
        parts = [feature]
    else:
        raise ValueError(f"cannot summarise a feature of shape {tuple(feature.shape)}")
    width = max_dim // len(parts)
    parts = [F.adaptive_avg_pool1d(p.unsqueeze(1), width).squeeze(1) if p.shape[1] > width else p for p in parts]
    return torch.cat(parts, dim=1)


def _intermediates(net: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    forward = getattr(net, "forward_intermediates", None)
    if forward is None:
        return None
    try:
        return forward(x)
    except (NotImplementedError, AssertionError, TypeError, AttributeError):
        return None  # a timm model whose intermediates need arguments we cannot guess: pre-logits only


def forward_with_features(
    net: Any, x: torch.Tensor, max_dim: int = MAX_DIM
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, [summary per depth])`` for a batch, equal in logits to ``net(x)`` (tested per family).

    A model with its own ``forward_with_guard_features`` (an ensemble) supplies both itself.
    """
    own = getattr(net, "forward_with_guard_features", None)
    if own is not None:
        return own(x, max_dim)
    out = _intermediates(net, x)
    if out is None:
        final, maps = net.forward_features(x), []
    else:
        final, maps = out
    pre_logits = net.forward_head(final, pre_logits=True)
    logits = net.forward_head(final)
    return logits, [summarize(m, max_dim) for m in maps] + [summarize(pre_logits, max_dim)]
