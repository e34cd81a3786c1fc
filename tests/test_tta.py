"""Test-time augmentation a model declares in its config.json: used by default, reported, and switchable off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.hub_fixtures import LABELS, write_model_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tta")
    plain = write_model_dir(root / "plain")
    flip = root / "flip"
    shutil.copytree(plain, flip)
    config = json.loads((flip / "config.json").read_text())
    config["derm_accel"] = {"tta": "flip"}
    (flip / "config.json").write_text(json.dumps(config))
    return plain, flip


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from derm_accel.data.synthetic import write_sample

    folder = write_sample(tmp_path_factory.mktemp("img"), num_classes=3, per_class=2, size=80, seed=3)
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def test_export_records_tta_and_load_reads_it(tmp_path: Path) -> None:
    from derm_accel.models.build import create_model, export_model
    from derm_accel.models.load import load_model

    folder = export_model(create_model("test_efficientnet", 3), tmp_path / "m", LABELS, tta="flip")
    assert json.loads((folder / "config.json").read_text())["derm_accel"]["tta"] == "flip"
    net, _ = load_model(str(folder))
    assert net.default_tta == "flip"


def test_predict_uses_the_declared_flip_tta_unless_turned_off(folders: tuple[Path, Path], images: list[str]) -> None:
    from PIL import Image

    from derm_accel import predict
    from derm_accel.inference.predict import prepared_model

    plain, flip = folders
    by_default = predict(images, model=str(flip), device="cpu", guard=False, top_k=3)
    assert by_default == predict(images, model=str(plain), device="cpu", guard=False, top_k=3, tta="flip")
    single = predict(images, model=str(flip), device="cpu", guard=False, top_k=3, tta="none")
    assert single == predict(images, model=str(plain), device="cpu", guard=False, top_k=3)
    assert single != by_default

    prepared = prepared_model(str(plain), "cpu", guard=False)
    x = torch.stack([prepared.transform(Image.open(p).convert("RGB")) for p in images])
    with torch.inference_mode():
        views = [prepared.net(v).softmax(-1) for v in (x, x.flip(-1), x.flip(-2))]
    expected = torch.stack(views).mean(0)
    for row, result in zip(expected, by_default, strict=True):
        got = {t["label"]: t["probability"] for t in result["top_k"]}
        assert [got[label] for label in LABELS] == pytest.approx(row.tolist(), abs=1e-5)


def test_evaluate_reports_the_tta_it_used(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from derm_accel.data.synthetic import write_dataset
    from derm_accel.evaluation.run import evaluate_model

    plain, flip = folders
    data = write_dataset(tmp_path / "data", {"test": [4, 4, 4]}, size=72, names=LABELS)
    default = evaluate_model(str(flip), data, out_dir=tmp_path / "a", num_workers=0)
    assert default["tta"]["method"] == "flip" and "single view" not in default["tta"]
    off = evaluate_model(str(flip), data, out_dir=tmp_path / "b", num_workers=0, tta="none")
    assert off["tta"] is None
    assert off["accuracy"] == pytest.approx(default["tta"]["before"]["accuracy"])
    asked = evaluate_model(str(plain), data, out_dir=tmp_path / "c", num_workers=0, tta="flip")
    assert asked["accuracy"] == pytest.approx(default["accuracy"]) and asked["macro_f1"] == pytest.approx(
        default["macro_f1"]
    )


def test_model_card_says_when_the_model_answers_with_flip_tta(folders: tuple[Path, Path]) -> None:
    from derm_accel.hub.card import build_model_card

    plain, flip = folders
    assert "flip test-time augmentation" in str(build_model_card(flip, "derm-lab/flip"))
    assert "test-time augmentation" not in str(build_model_card(plain, "derm-lab/plain")).split("## How to use")[1]
