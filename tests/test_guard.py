"""The domain guard: features, fitting, thresholds, files, and its place in predict, evaluate and push."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from derm_accel.guard.fit import Scored, fit_guard, selective_threshold
from derm_accel.guard.model import GUARD_FILE, DomainGuard, read_guard, save_guard, verdict
from derm_accel.models.features import forward_with_features, summarize


def natural_photos() -> list[Path]:
    """Everyday photos shipped with scikit-image: real images that are not skin."""
    skimage = pytest.importorskip("skimage", reason="scikit-image (a dev dependency) ships the natural photos")
    folder = Path(skimage.__file__).parent / "data"
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet", "test_convnext", "test_vit"])
def test_one_pass_gives_the_same_logits_as_forward(arch: str) -> None:
    import timm

    torch.manual_seed(0)
    net = timm.create_model(arch, num_classes=5).eval()
    x = torch.randn(3, 3, *net.pretrained_cfg["input_size"][-2:])
    with torch.no_grad():
        logits, features = forward_with_features(net, x)
        torch.testing.assert_close(logits, net(x), rtol=0, atol=1e-5)
    assert len(features) >= 2  # several depths, plus pre-logits
    assert all(f.shape[0] == 3 and f.ndim == 2 and f.shape[1] <= 512 for f in features)


def test_summaries_are_channel_mean_and_std() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    s = summarize(x)
    torch.testing.assert_close(s[:, :3], x.flatten(2).mean(-1))
    torch.testing.assert_close(s[:, 3:], x.flatten(2).std(-1, correction=0))
    assert summarize(torch.randn(2, 5000)).shape == (2, 512)  # wide vectors are pooled down


def _gaussian_scored(rng: np.random.Generator, n: int, shift: float = 0.0) -> Scored:
    dims = (6, 10)
    feats = [torch.from_numpy(rng.normal(shift, 1.0, (n, d))).float() for d in dims]
    logits = torch.from_numpy(rng.normal(0, 2, (n, 3))).float()
    return Scored(logits, feats, torch.from_numpy(rng.integers(0, 3, n)))


@pytest.mark.parametrize("share", [0.8, 0.95])
def test_threshold_lets_the_chosen_share_of_new_in_domain_images_pass(share: float) -> None:
    rng = np.random.default_rng(0)
    guard, _ = fit_guard(_gaussian_scored(rng, 600), _gaussian_scored(rng, 800), in_domain_share=share)
    fresh = _gaussian_scored(rng, 4000)
    passed = float((guard.score(fresh.features) <= guard.threshold).float().mean())
    assert passed == pytest.approx(share, abs=0.03)
    far = _gaussian_scored(rng, 200, shift=2.0)
    assert float((guard.score(far.features) > guard.threshold).float().mean()) > 0.99


def test_selective_threshold_keeps_error_under_target_with_most_coverage() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    correct = np.array([1, 1, 1, 1, 0, 1, 1, 0, 0, 0], dtype=bool)
    out = selective_threshold(confidence, correct, 0.2)
    # Answering the 7 most confident gives 1/7 errors; the 8th would make 2/8 = 0.25 > 0.2.
    assert out["confidence_threshold"] == 0.5
    assert out["validation_coverage"] == pytest.approx(0.7)
    assert out["validation_risk"] == pytest.approx(1 / 7)
    assert out["target_met"]
    unreachable = selective_threshold(confidence, ~correct, 0.05)
    assert not unreachable["target_met"]


def test_verdict_fields() -> None:
    guard = DomainGuard([torch.zeros(2)], [torch.eye(2)], torch.zeros(1), torch.ones(1), 3.0, 0.6)
    assert verdict(guard, 1.0, 0.9) == {"ood_score": 1.0, "in_domain": True, "abstain": False, "reason": None}
    low = verdict(guard, 1.0, 0.5)
    assert low["in_domain"] and low["abstain"] and "low confidence" in low["reason"]
    out = verdict(guard, 7.5, 0.99)
    assert out["in_domain"] is False and out["abstain"] and "out of domain" in out["reason"]
    assert verdict(None, None, 0.9)["in_domain"] is None


@pytest.fixture(scope="module")
def guarded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/hub_fixtures' tiny exported model with a guard fitted on generated lesions."""
    from tests.hub_fixtures import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("guarded"), guard=True)


def test_guard_files_round_trip_and_plain_timm_still_loads(guarded_model: Path) -> None:
    import timm

    config = json.loads((guarded_model / "config.json").read_text())
    settings = config["derm_accel"]
    assert settings["domain_guard"]["file"] == GUARD_FILE
    assert 0.5 < settings["domain_guard"]["in_domain_share"] < 1
    guard = read_guard(guarded_model)
    assert guard is not None and guard.threshold == settings["domain_guard"]["threshold"]
    net = timm.create_model(f"local-dir:{guarded_model}", pretrained=True).eval()  # ignores the guard
    assert net.num_classes == len(config["label_names"])
    copy = guarded_model.parent / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((guarded_model / "config.json").read_text())
    save_guard(guard, copy)
    again = read_guard(copy)
    for a, b in zip(guard.precisions, again.precisions, strict=True):
        assert torch.equal(a, b)


def test_guard_flags_natural_photos_and_never_changes_the_label(guarded_model: Path, tmp_path: Path) -> None:
    from derm_accel.data.synthetic import render
    from derm_accel.inference.predict import predict

    lesions = []
    for i in range(12):  # new renders of the classes the guard was fitted on
        lesions.append(tmp_path / f"lesion{i}.jpg")
        render(i % 3, seed=1000 + i, size=96).save(lesions[-1])
    photos = [str(p) for p in natural_photos()]
    with_guard = predict([str(p) for p in lesions] + photos, model=str(guarded_model), device="cpu")
    without = predict([str(p) for p in lesions] + photos, model=str(guarded_model), device="cpu", guard=False)
    for a, b in zip(with_guard, without, strict=True):
        assert (a["label"], a["probability"]) == (b["label"], b["probability"])
        assert b["in_domain"] is None and b["ood_score"] is None and b["reason"] == "domain guard turned off"
    lesion_flags = [r["in_domain"] for r in with_guard[: len(lesions)]]
    photo_flags = [r["in_domain"] for r in with_guard[len(lesions) :]]
    assert sum(lesion_flags) >= 10  # at most 2 of 12 new in-domain images flagged
    assert sum(not f for f in photo_flags) >= 0.95 * len(photo_flags)
    assert all(r["abstain"] for r in with_guard[len(lesions) :] if not r["in_domain"])
    json.dumps(with_guard, allow_nan=False)  # valid JSON, every field


def test_evaluate_reports_out_of_domain_sets(guarded_model: Path, tmp_path: Path) -> None:
    from derm_accel.evaluation.run import evaluate_model
    from tests.hub_fixtures import LABELS
    from tests.train_utils import make_dataset

    data = make_dataset(tmp_path / "data", num_classes=len(LABELS), size=64)
    from datasets import ClassLabel, load_from_disk

    dataset = load_from_disk(str(data))
    renamed = dataset.cast_column("label", ClassLabel(names=LABELS))
    renamed.save_to_disk(str(tmp_path / "data2"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in natural_photos()[:8]:
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "broken.jpg").write_bytes(b"not an image")
    metrics = evaluate_model(
        str(guarded_model), tmp_path / "data2", split="train", out_dir=tmp_path / "report", num_workers=0,
        ood=[str(photos)],
    )
    block = metrics["out_of_domain"]
    assert block["guard"]["threshold"] == read_guard(guarded_model).threshold
    (entry,) = block["sets"]
    assert entry["images"] == 8 and entry["skipped"][0]["path"].endswith("broken.jpg")
    assert set(entry["scores"]) == {"ood_score", "softmax_confidence", "energy"}
    assert entry["scores"]["ood_score"]["auroc"] > 0.9
    assert 0 <= block["aurc"] <= 1
    everything, most, half = block["operating_points"]  # answering all, the 80% and the 50% most confident
    assert everything["coverage"] == 1.0 and everything["risk"] == pytest.approx(1 - metrics["accuracy"], abs=1e-6)
    assert most["coverage"] == pytest.approx(39 / 48) and half["coverage"] == 0.5
    assert half["confidence_threshold"] >= most["confidence_threshold"] >= everything["confidence_threshold"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Out-of-domain inputs and abstention" in report and "| photos | 8 |" in report
    assert f"| answer every image | 100.0% | {everything['risk']:.1%} |" in report
    assert "| the 50% most confident | 50.0% |" in report and "| the model's rule (guard + abstention" in report
    assert (tmp_path / "report" / "risk_coverage.png").stat().st_size > 1000
