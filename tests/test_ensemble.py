"""Ensembles: probabilities averaged over members, in evaluate, predict and ensemble folders."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hub_fixtures import LABELS, write_model_dir


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    return [write_model_dir(root / f"m{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from derm_accel.data.synthetic import write_sample

    folder = tmp_path_factory.mktemp("images")
    write_sample(folder, num_classes=3, per_class=3, size=72, seed=1)
    return folder


def test_combine_is_the_log_of_the_mean_probability() -> None:
    from derm_accel.models.tta import combine

    logits = torch.randn(5, 3, 7) * 4
    expected = logits.softmax(-1).mean(1)
    assert torch.allclose(combine(logits).softmax(-1), expected, atol=1e-6)
    assert torch.allclose(combine(logits).exp().sum(-1), torch.ones(5), atol=1e-6)  # already normalised


def test_predict_averages_member_probabilities(members: list[Path], images: Path) -> None:
    from derm_accel import predict

    files = sorted(str(p) for p in images.rglob("*.png"))[:4]
    alone = [predict(files, model=str(m), top_k=3, device="cpu", guard=False) for m in members]
    together = predict(files, model=[str(m) for m in members], top_k=3, device="cpu", guard=False)
    for i, result in enumerate(together):
        mean = {
            label: np.mean([{t["label"]: t["probability"] for t in a[i]["top_k"]}[label] for a in alone])
            for label in LABELS
        }
        assert result["label"] == max(mean, key=mean.get)
        assert {t["label"]: t["probability"] for t in result["top_k"]} == pytest.approx(mean, abs=1e-5)


def test_ensemble_folder_loads_and_is_checked(members: list[Path], tmp_path: Path) -> None:
    from derm_accel.core.artifacts import ENSEMBLE_FILE
    from derm_accel.models.ensemble import Ensemble, EnsembleError, load_models, write_ensemble

    root = tmp_path / "ens"
    for i, m in enumerate(members):
        shutil.copytree(m, root / f"fold_{i + 1}" / "best")
    write_ensemble(root, ["fold_1/best", "fold_2/best"])
    net, labels = load_models(str(root))
    assert isinstance(net, Ensemble) and labels == LABELS and len(net.members) == 2

    (root / ENSEMBLE_FILE).write_text(json.dumps({"members": ["fold_1/best", "../elsewhere"]}))
    with pytest.raises(EnsembleError, match="outside"):
        load_models(str(root))
    (root / ENSEMBLE_FILE).write_text(json.dumps({"members": ["fold_1/best", "fold_9/best"]}))
    with pytest.raises(EnsembleError, match="fold_9"):
        load_models(str(root))


def test_members_with_other_classes_are_refused(members: list[Path], tmp_path: Path) -> None:
    from derm_accel.models.ensemble import EnsembleError, load_models

    other = tmp_path / "other"
    shutil.copytree(members[1], other)
    config = json.loads((other / "config.json").read_text())
    config["label_names"] = list(reversed(config["label_names"]))
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(EnsembleError, match="same classes in the same order"):
        load_models([str(members[0]), str(other)])


def test_evaluate_reports_the_ensemble_beside_each_member(members: list[Path], tmp_path: Path) -> None:
    from derm_accel.data.synthetic import write_dataset
    from derm_accel.evaluation.run import evaluate_model

    data = write_dataset(tmp_path / "data", {"test": [6, 6, 6]}, size=72, names=LABELS)
    single = [
        evaluate_model(str(m), data, split="test", out_dir=tmp_path / f"r{i}", num_workers=0, tta="flip")
        for i, m in enumerate(members)
    ]
    both = evaluate_model(
        [str(m) for m in members], data, split="test", out_dir=tmp_path / "ens", num_workers=0, tta="flip"
    )
    rows = both["ensemble"]["members"]
    assert [r["accuracy"] for r in rows] == pytest.approx([s["accuracy"] for s in single])
    assert [r["macro_f1"] for r in rows] == pytest.approx([s["macro_f1"] for s in single])
    alone = [_probabilities(tmp_path / f"r{i}" / "predictions.csv") for i in range(2)]
    assert _probabilities(tmp_path / "ens" / "predictions.csv") == pytest.approx((alone[0] + alone[1]) / 2, abs=1e-5)
    report = (tmp_path / "ens" / "report.md").read_text()
    assert "## Ensemble and its members" in report and "**ensemble**" in report
    assert both["model"].startswith("ensemble of 2")


def _probabilities(path: Path) -> np.ndarray:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r[label]) for label in LABELS] for r in rows])


def test_explain_refuses_an_ensemble_and_names_a_member(members: list[Path], images: Path) -> None:
    from derm_accel.core.errors import InputError
    from derm_accel.inference.explain import explain

    with pytest.raises(InputError, match="fold_1/best"):
        explain(sorted(images.rglob("*.jpg"))[:1], model=[str(m) for m in members], out_dir=images / "cam")


def test_evaluate_scores_the_split_once_and_the_ensembles_baselines_are_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass over the split gives the logits and the guard's features; the out-of-domain section's in-domain
    figures (AURC, guard flags) come from the ensemble's answers, not from its first member's."""
    import derm_accel.evaluation.ood as ood_module
    from derm_accel.data.synthetic import write_dataset
    from derm_accel.evaluation.run import evaluate_model
    from derm_accel.guard.scoring import risk_coverage

    guarded = [write_model_dir(tmp_path / f"g{i}", seed=i, guard=True) for i in range(2)]
    data = write_dataset(tmp_path / "data", {"test": [6, 6, 6]}, size=72, names=LABELS)
    passes = []
    real = ood_module.score_batches
    monkeypatch.setattr(ood_module, "score_batches", lambda *a, **k: passes.append(1) or real(*a, **k))
    both = evaluate_model([str(m) for m in guarded], data, split="test", out_dir=tmp_path / "ens", num_workers=0)
    assert passes == []  # the split's guard scores came from evaluate's own pass
    probs = _probabilities(tmp_path / "ens" / "predictions.csv")
    with (tmp_path / "ens" / "predictions.csv").open() as f:
        truth = np.array([LABELS.index(r["true_label"]) for r in csv.DictReader(f)])
    expected = risk_coverage(probs.max(1), probs.argmax(1) == truth)["aurc"]
    assert both["out_of_domain"]["aurc"] == pytest.approx(expected, abs=1e-6)
    first = evaluate_model(str(guarded[0]), data, split="test", out_dir=tmp_path / "first", num_workers=0)
    assert first["out_of_domain"]["aurc"] != pytest.approx(expected, abs=1e-6)  # the member alone differs
    # the first member's guard, fed the same features either way, flags the same images
    assert both["out_of_domain"]["guard"]["in_domain_flagged"] == first["out_of_domain"]["guard"]["in_domain_flagged"]
