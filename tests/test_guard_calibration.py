"""The guard's threshold holds on new images of the same collection (split-conformal on held-out images), the
default abstention answers a fixed share, the risk-coverage curve is tie-aware, and the fit holds a bounded,
class-stratified sample of the training split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from derm_accel.guard.fit import (
    Scored,
    conformal_rank,
    conformal_threshold,
    fit_guard,
    selective_threshold,
    stratified_sample,
)
from derm_accel.guard.scoring import operating_points, risk_coverage


def _scored(rng: np.random.Generator, n: int, spread: float) -> Scored:
    feats = [torch.from_numpy(rng.normal(0, spread, (n, d))).float() for d in (6, 10)]
    logits = torch.from_numpy(rng.normal(0, 2, (n, 3))).float()
    return Scored(logits, feats, torch.from_numpy(rng.integers(0, 3, n)))


def test_threshold_holds_on_new_images_when_training_features_are_tighter_than_new_ones() -> None:
    """A network fits its own training images: their features sit closer to the mean than any new image's, even
    cross-fitted. A threshold from training scores then flags far more new images than promised (18% for 5%
    here, as 15.6% on the quickstart's model); one set on held-out validation images keeps the promise."""
    rng = np.random.default_rng(0)
    train, val, new = _scored(rng, 600, 0.85), _scored(rng, 150, 1.0), _scored(rng, 4000, 1.0)
    guard, diagnostics = fit_guard(train, val, in_domain_share=0.95)
    flagged = float((guard.score(new.features) > guard.threshold).float().mean())
    assert 0.005 < flagged < 0.06  # at most 5% with 90% confidence: 147th of 150 scores, 2% on average
    pooled = np.concatenate([diagnostics["cross_fitted_train_scores"], diagnostics["validation_ood_scores"]])
    previous = float((guard.score(new.features) > float(np.quantile(pooled, 0.95))).float().mean())
    assert previous > 0.12  # the rule this replaces
    settings = guard.settings["domain_guard"]
    assert settings["threshold_images"] == 150 and settings["fit_images"] == 600 and settings["threshold_rank"] == 147
    assert settings["training_flagged"] < 0.02  # the training images' optimism, recorded


def test_conformal_threshold_lets_the_share_pass_with_90_percent_confidence() -> None:
    scores = np.arange(1.0, 20.0)[::-1]  # 19 scores, given in any order
    # P(Binomial(19, 0.8) >= 18) = 0.083 <= 0.1 but P(>= 17) = 0.24: the 18th smallest
    assert conformal_threshold(scores, 0.8) == 18.0
    assert conformal_rank(19, 0.95) == (19, False)  # too few images for 95% with 90% confidence: the largest
    assert conformal_rank(59, 0.95) == (59, True)
    assert conformal_rank(24500, 0.95)[0] / 24501 == pytest.approx(0.952, abs=1e-3)  # near 95% at scale
    # Over many draws of 40 held-out scores, at least 90% of thresholds let >= 80% of new images pass.
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    passes = np.array([norm.cdf(conformal_threshold(rng.normal(size=40), 0.8)) for _ in range(4000)])
    assert 0.9 <= (passes >= 0.8).mean() <= 0.95
    assert passes.mean() == pytest.approx(conformal_rank(40, 0.8)[0] / 41, abs=0.01)


def test_default_abstention_answers_the_target_coverage_whatever_the_error() -> None:
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.2, 1.0, 200)
    correct = rng.uniform(size=200) < 0.5  # a weak model: no threshold reaches 10% error
    out = selective_threshold(confidence, correct)
    assert out["policy"] == "coverage" and out["target_coverage"] == 0.8
    answered = confidence >= out["confidence_threshold"]
    assert answered.mean() == pytest.approx(0.8) == out["validation_coverage"]
    assert out["validation_risk"] == pytest.approx(1 - correct[answered].mean())
    by_error = selective_threshold(confidence, correct, target_error=0.10)
    assert by_error["policy"] == "error" and by_error["validation_coverage"] < 0.2  # what the error rule answers
    assert by_error["validation_risk"] <= 0.10
    ties = selective_threshold(np.array([0.9, 0.9, 0.9, 0.5]), np.ones(4, bool), target_coverage=0.5)
    assert ties["validation_coverage"] == 0.75  # tied images are answered together


def test_risk_coverage_does_not_depend_on_the_order_of_tied_confidences() -> None:
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 0.5, 0.5])
    correct = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    first = risk_coverage(confidence, correct)
    flipped = risk_coverage(confidence, correct[[3, 2, 1, 0, 5, 4]])
    np.testing.assert_allclose(first["risk"], flipped["risk"])
    assert first["aurc"] == pytest.approx(0.5)  # every prefix: expected error 1/2
    np.testing.assert_allclose(first["risk"], 0.5)
    points = operating_points(np.array([0.95, 0.9, 0.8, 0.6]), np.array([1, 1, 0, 0], dtype=bool), (1, 0.75, 0.5))
    assert [p["coverage"] for p in points] == [1.0, 0.75, 0.5]
    assert [p["risk"] for p in points] == pytest.approx([0.5, 1 / 3, 0.0])
    assert [p["confidence_threshold"] for p in points] == [0.6, 0.8, 0.9]


def test_stratified_sample_is_seeded_proportional_and_keeps_every_class() -> None:
    labels = np.r_[np.zeros(900, int), np.ones(90, int), np.full(10, 2)]
    picked = stratified_sample(labels, 100, seed=0)
    assert len(picked) == 100 and np.all(np.diff(picked) > 0)
    assert np.bincount(labels[picked]).tolist() == [90, 9, 1]
    assert np.array_equal(picked, stratified_sample(labels, 100, seed=0))
    assert not np.array_equal(picked, stratified_sample(labels, 100, seed=1))
    rare = np.r_[np.zeros(500, int), [1]]
    assert np.bincount(rare[stratified_sample(rare, 10)]).tolist() == [9, 1]
    assert np.array_equal(stratified_sample(labels[:50], 100), np.arange(50))


def test_fit_model_guard_scores_only_a_sample_of_the_training_split(tmp_path: Path, monkeypatch) -> None:
    """At most max_fit_images training images are decoded and their features kept; validation images become
    scores batch by batch; config.json records the sample."""
    from datasets import ClassLabel, load_from_disk

    import derm_accel.guard.fit as fit
    from tests.hub_fixtures import LABELS, write_model_dir
    from tests.train_utils import make_dataset

    model = write_model_dir(tmp_path / "m")
    data = make_dataset(tmp_path / "d", num_classes=len(LABELS), size=48)
    load_from_disk(str(data)).cast_column("label", ClassLabel(names=LABELS)).save_to_disk(str(tmp_path / "data"))
    seen: list[Scored] = []
    real = fit.score_batches

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(fit, "score_batches", spy)
    config = fit.fit_model_guard(model, tmp_path / "data", max_fit_images=24, batch_size=16, device="cpu")
    train, val = seen
    assert len(train.logits) == 24 and np.bincount(train.labels.numpy()).tolist() == [8, 8, 8]
    assert val.features == [] and len(val.ood_scores) == 15  # 5 validation images per class, no features kept
    sample = config["domain_guard"]["fit_sample"]
    assert sample == {"images": 24, "of": 48, "max_fit_images": 24, "seed": 0, "stratified_by": "label"}
    stored = json.loads((model / "config.json").read_text())["derm_accel"]
    assert stored["domain_guard"]["fit_images"] == 24 and stored["domain_guard"]["threshold_images"] == 15
    assert stored["selective_prediction"]["policy"] == "coverage"
    with pytest.raises(ValueError, match="max_fit_images must be at least 20"):
        fit.fit_model_guard(model, tmp_path / "data", max_fit_images=5, device="cpu")
    with pytest.raises(ValueError, match=r"target_coverage must be in \(0, 1\], got 1.5"):
        fit.fit_model_guard(model, tmp_path / "data", target_coverage=1.5, device="cpu")
    assert len(seen) == 2  # refused before any image was scored
