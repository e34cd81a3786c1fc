"""Grad-CAM heatmaps from a small trained-layout model: files, value ranges, targets and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from derm_accel.cli import app
from derm_accel.data.synthetic import render
from derm_accel.inference.explain import grad_cam
from derm_accel.models.build import create_model, export_model

LABELS = ["melanoma", "nevus", "psoriasis"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("test_resnet", len(LABELS))
    return export_model(model, tmp_path_factory.mktemp("explain") / "best", LABELS)


def test_grad_cam_is_a_normalised_map_that_depends_on_the_class() -> None:
    torch.manual_seed(0)
    model = create_model("test_resnet", 3).eval()
    x = torch.randn(1, 3, 64, 64)
    cams = [grad_cam(model, x, target)[0] for target in range(3)]
    for cam in cams:
        assert cam.shape == (64, 64) and cam.min() >= 0 and cam.max() <= 1 + 1e-6
    assert not np.allclose(cams[0], cams[1])  # another class, another explanation
    assert all(p.grad is None for p in model.parameters())  # the shared cached model is left untouched
    _, index, probability = grad_cam(model, x)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert index == int(probs.argmax()) and probability == pytest.approx(float(probs.max()), rel=1e-5)


def test_explain_cli_writes_heatmaps_and_reports_bad_files(model_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "lesion.jpg"
    render(0, 1, 96).save(good)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "heatmaps"
    result = CliRunner().invoke(
        app, ["explain", str(good), str(bad), "--model", str(model_dir), "--out", str(out), "--target", "nevus"]
    )
    assert result.exit_code == 1  # one file failed, the other was explained
    assert "nevus" in result.output and "ERROR" in result.output
    heatmap = Image.open(out / "lesion_gradcam.png")
    assert heatmap.size[0] == 2 * heatmap.size[1]  # the crop and its overlay side by side


def test_unknown_target_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    render(0, 1, 64).save(tmp_path / "a.jpg")
    result = CliRunner().invoke(
        app, ["explain", str(tmp_path / "a.jpg"), "--model", str(model_dir), "--target", "acne"]
    )
    assert result.exit_code == 2 and "acne" in result.output and "melanoma" in result.output


def test_same_file_names_in_two_folders_get_two_heatmaps(model_dir: Path, tmp_path: Path) -> None:
    for i, folder in enumerate(("melanoma", "nevus")):
        (tmp_path / "in" / folder).mkdir(parents=True)
        render(i, 1, 64).save(tmp_path / "in" / folder / "img1.jpg")
    result = CliRunner().invoke(
        app, ["explain", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img1_2_gradcam.png", "img1_gradcam.png"]
