"""Temperature scaling and calibration error.

A network's softmax is usually over-confident; one temperature fitted on the validation split (Guo et al.)
fixes most of it without changing any prediction, which matters when a clinician reads the probability.
"""

from __future__ import annotations

import math

import torch

from derm_accel.evaluation.derm_metrics.derm_metrics import expected_calibration_error


def tta_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax of ``logits / temperature`` averaged over views; ``logits`` is (N, C) or (N, V, C)."""
    logits = logits.float()
    if logits.ndim == 2:
        logits = logits[:, None]
    return torch.softmax(logits / temperature, dim=-1).mean(dim=1)


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean NLL of the (view-averaged) tempered probabilities."""
    probs = tta_probabilities(logits, temperature)
    true = probs.gather(1, labels.long()[:, None]).squeeze(1).clamp_min(torch.finfo(probs.dtype).tiny)
    return float(-true.log().mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature minimising validation NLL (LBFGS on log T, so T stays positive).

    ``logits`` may hold several test-time views, (N, V, C): the temperature is then fitted for the averaged
    probabilities actually reported, not for a single view.
    """
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    logits = logits.detach().double()
    if logits.ndim == 2:
        logits = logits[:, None]
    labels = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_probs = torch.log_softmax(logits / log_t.exp(), dim=-1)
        # log of the mean over views of softmax, computed stably.
        log_mean = torch.logsumexp(log_probs, dim=1) - math.log(logits.shape[1])
        loss = torch.nn.functional.nll_loss(log_mean, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise RuntimeError(
            f"temperature scaling diverged (T={temperature}); the validation logits may hold NaNs"
        )
    return temperature


def reliability_bins(
    labels: torch.Tensor, probabilities: torch.Tensor, n_bins: int = 15
) -> tuple[float, list[dict]]:
    """ECE and its bins, with the exact binning of the shipped metric (one definition, used by plots too)."""
    return expected_calibration_error(labels.numpy(), probabilities.double().numpy(), n_bins)
