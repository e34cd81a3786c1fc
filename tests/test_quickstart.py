"""End to end: the quickstart chains the real stages and leaves every artifact in the workdir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from datasets import load_from_disk
from typer.testing import CliRunner

from derm_accel.cli import app
from tests.conftest import DERM_SAMPLE, LITE0_WEIGHTS, needs_derm_sample, needs_lite0

pytestmark = pytest.mark.slow


def _check_artifacts(workdir: Path, summary: dict, num_classes: int) -> None:
    data = load_from_disk(str(workdir / "data"))
    assert set(data) == {"train", "validation", "test"}
    assert data["train"].features["label"].num_classes == num_classes
    assert (workdir / "data" / "conversion_report.json").is_file()

    best = workdir / "run" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["num_classes"] == num_classes
    assert config["label_names"] == data["train"].features["label"].names
    # The exported model is a plain timm checkpoint.
    model = timm.create_model(f"local-dir:{best}", pretrained=True).eval()
    with torch.inference_mode():
        assert model(torch.zeros(1, *config["pretrained_cfg"]["input_size"])).shape == (1, num_classes)

    metrics = json.loads((workdir / "report" / "metrics.json").read_text())
    assert metrics["num_samples"] == len(data["test"]) == summary["num_test"]
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"])
    for name in ("report.md", "predictions.csv", "confusion_matrix.png"):
        assert (workdir / "report" / name).is_file(), name

    staged = workdir / "hub"
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in staged.iterdir()}
    prediction = json.loads((workdir / "prediction.json").read_text())
    assert prediction["label"] in config["label_names"]
    assert 0 < prediction["probability"] <= 1


def test_quickstart_default_sample(tmp_path: Path) -> None:
    """The README's first line: the generated sample, a small model from scratch, well above chance."""
    result = CliRunner().invoke(app, ["quickstart", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "test accuracy" in result.output and str(tmp_path) in result.output
    _check_artifacts(tmp_path, summary, num_classes=6)
    assert summary["test_accuracy"] > 0.4  # chance is 1/6
    assert summary["timings_s"]["total"] > 0


@needs_derm_sample
@needs_lite0
def test_quickstart_real_sample_pretrained(tmp_path: Path) -> None:
    """Real dermoscopic images, ImageNet-pretrained EfficientNet-Lite0: well above chance (1/9) after one epoch."""
    result = CliRunner().invoke(
        app,
        [
            "quickstart", "--workdir", str(tmp_path), "--data", str(DERM_SAMPLE),
            "--model", "tf_efficientnet_lite0", "--pretrained-file", str(LITE0_WEIGHTS), "--epochs", "1",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    _check_artifacts(tmp_path, summary, num_classes=9)
    assert summary["test_accuracy"] > 0.25  # one epoch of fine-tuning; from scratch it stays near chance
