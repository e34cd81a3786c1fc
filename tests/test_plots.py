"""Report figures: per-class AUC in the ROC legend, precision-recall curves, learning curves from the run's logs,
and a reliability diagram whose bins adapt to the number of images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from derm_accel.evaluation import plots

NAMES = ["melanoma", "nevus", "keratosis"]


@pytest.fixture()
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(31) % 3
    logits = rng.normal(size=(31, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def _legend_texts(monkeypatch: pytest.MonkeyPatch, draw) -> list[str]:
    """The legend entries of the figure ``draw`` saves."""
    saved: list[Figure] = []
    original = plots._save

    def keep(fig: Figure, path):
        saved.append(fig)
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    draw()
    return [t.get_text() for ax in saved[0].axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_roc_legend_gives_each_class_auc(scored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    y, probs = scored
    texts = _legend_texts(monkeypatch, lambda: plots.plot_roc_curves(y, probs, NAMES, tmp_path / "roc.png"))
    for c, name in enumerate(NAMES):
        assert f"{name} (AUC {roc_auc_score(y == c, probs[:, c]):.3f})" in texts
    assert any(t.startswith("micro average (AUC 0.") for t in texts)


def test_precision_recall_figure_gives_each_class_ap(scored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    y, probs = scored
    path = tmp_path / "pr.png"
    texts = _legend_texts(monkeypatch, lambda: plots.plot_precision_recall(y, probs, NAMES, path))
    for c, name in enumerate(NAMES):
        assert f"{name} (AP {average_precision_score(y == c, probs[:, c]):.3f})" in texts
    with Image.open(path) as image:
        assert image.size[0] > 300


@pytest.mark.parametrize(("n", "bins"), [(31, 5), (12, 2), (4, 1), (1000, 15)])
def test_reliability_bins_hold_equal_shares_and_adapt_to_n(n: int, bins: int) -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.3, 1.0, n)
    correct = rng.uniform(size=n) < confidence
    result = plots.equal_mass_bins(confidence, correct)
    counts = [b["count"] for b in result]
    assert len(result) == bins and sum(counts) == n and max(counts) - min(counts) <= 1
    assert [b["confidence"] for b in result] == sorted(b["confidence"] for b in result)
    first = np.sort(confidence)[: counts[0]]
    assert result[0]["confidence"] == pytest.approx(first.mean())


def test_reliability_diagram_has_a_count_histogram(scored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    y, probs = scored
    saved: list[Figure] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or Path(path))
    plots.plot_reliability({"model": (y, probs)}, tmp_path / "rel.png")
    diagram, histogram = saved[0].axes
    assert "equal-mass bins of ~6 images" in diagram.get_title()
    assert histogram.get_ylabel() == "images"
    (step,) = histogram.patches  # a step histogram of the confidences, in image counts
    assert step.get_path().vertices[:, 1].max() >= 3


def _metrics_jsonl(logs: Path) -> list[dict]:
    logs.mkdir(parents=True)
    records = [
        {"step": 1, "train/loss": 1.2, "train/lr": 1e-3, "epoch": 1},
        {"step": 2, "epoch": 1, "train/loss_epoch": 1.1, "train/lr": 1e-3, "val/loss": 1.0, "val/accuracy": 0.4,
         "val/macro_f1": 0.3},
        {"step": 4, "epoch": 2, "train/loss_epoch": 0.8, "train/lr": 5e-4, "val/loss": 0.9, "val/accuracy": 0.6,
         "val/macro_f1": 0.5},
    ]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_learning_curves_per_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _metrics_jsonl(tmp_path / "logs")
    saved: list[Figure] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or Path(path))
    assert plots.plot_learning_curves(records, tmp_path / "lc.png") is not None
    panels = {ax.get_title(): ax for ax in saved[0].axes}
    assert set(panels) == {"loss", "accuracy", "macro-F1", "learning rate"}
    (val_f1,) = panels["macro-F1"].get_lines()
    assert list(val_f1.get_xdata()) == [1, 2] and list(val_f1.get_ydata()) == [0.3, 0.5]
    assert [line.get_label() for line in panels["loss"].get_lines()] == ["train", "validation"]
    assert plots.plot_learning_curves(records[:1], tmp_path / "none.png") is None  # no epoch ended yet


def test_evaluate_writes_learning_curves_when_the_run_logs_are_beside_the_model(tmp_path: Path) -> None:
    from derm_accel.data.synthetic import write_dataset
    from derm_accel.evaluation import evaluate_model
    from tests.hub_fixtures import LABELS, write_model_dir

    model_dir = write_model_dir(tmp_path / "run")  # tmp/run/best
    _metrics_jsonl(model_dir.parent / "logs")
    data = write_dataset(tmp_path / "data", {"train": [1, 1, 1], "validation": [1, 1, 1], "test": [3, 3, 3]},
                         size=48, names=LABELS)
    metrics = evaluate_model(str(model_dir), data, out_dir=tmp_path / "report", batch_size=9, num_workers=0)
    report = tmp_path / "report"
    assert metrics["learning_curves"] == "learning_curves.png"
    for name in ("learning_curves.png", "precision_recall.png"):
        assert (report / name).read_bytes().startswith(b"\x89PNG")
        assert name in (report / "report.md").read_text()
