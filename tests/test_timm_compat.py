"""What timm users expect of an exported model: config.json describes it, and timm's own validation recipe
(resolve_model_data_config(use_test_size=True) + create_transform + a plain loop, as timm's validate.py does)
scores it like derm-accel evaluate does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from derm_accel.data.synthetic import class_names, render, write_dataset
from derm_accel.models.build import INHERITED_CFG_KEYS, base_weights, create_model, export_model
from tests.conftest import LITE0_WEIGHTS, needs_lite0

NAMES = sorted(class_names(3))


def _trained_model(size: int) -> torch.nn.Module:
    """A test_resnet fitted for a few steps at ``size`` px: right and wrong answers, no degenerate metric."""
    torch.manual_seed(0)
    model = create_model("test_resnet", len(NAMES))
    images = [np.array(render(i % 3, 500 + i, size)) for i in range(36)]
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    y = torch.arange(36) % 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # What an ImageNet pretrained_cfg brings along, at another size than the one trained at.
    model.pretrained_cfg = dict(
        model.pretrained_cfg,
        input_size=(3, size, size),
        crop_pct=0.9,
        test_input_size=(3, 2 * size, 2 * size),
        test_crop_pct=1.0,
        origin_url="https://github.com/huggingface/pytorch-image-models",
        paper_ids="arXiv:1512.03385",
    )
    return model.eval()


def timm_validate(model_name: str, folder: Path, label_names: list[str]) -> tuple[float, list[int]]:
    """timm's validate.py in a few lines: test-size data config, timm's eval transform, top-1 over a folder."""
    model = timm.create_model(model_name, pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model, use_test_size=True)
    transform = timm.data.create_transform(**config, is_training=False)
    files = sorted(folder.rglob("*.jpg"))
    targets = [label_names.index(p.parent.name) for p in files]
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
        predicted = model(x).argmax(-1).tolist()
    return float(np.mean(np.array(predicted) == np.array(targets))), predicted


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(_trained_model(40), tmp_path_factory.mktemp("run") / "best", NAMES, license="cc-by-4.0")


def test_exported_config_has_no_inherited_imagenet_metadata(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert not {"tag", "origin_url", "hf_hub_id", "url", "paper_ids", "pool_size"} & set(cfg)
    assert cfg["license"] == "cc-by-4.0"  # ours, not timm's apache-2.0 for the ImageNet weights
    assert cfg["input_size"] == cfg["test_input_size"] == [3, 40, 40]
    assert cfg["crop_pct"] == cfg["test_crop_pct"] == 0.9
    assert cfg["label_names"] == NAMES
    assert "license" in INHERITED_CFG_KEYS  # an export without a known license carries none


def test_timm_validation_matches_derm_accel_evaluate(exported: Path, tmp_path: Path) -> None:
    from derm_accel.evaluation import evaluate_model

    split_counts = {"train": [1, 1, 1], "validation": [1, 1, 1], "test": [5, 5, 5]}
    data = write_dataset(tmp_path / "data", split_counts, size=56, names=NAMES)
    from datasets import load_from_disk

    test = load_from_disk(str(data))["test"]
    folder = tmp_path / "images"
    for i, row in enumerate(test):
        (folder / NAMES[row["label"]]).mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / NAMES[row["label"]] / f"{i:03d}.jpg", quality=95)
    metrics = evaluate_model(str(exported), data, out_dir=tmp_path / "report", batch_size=8, num_workers=0)
    top1, _ = timm_validate(f"local-dir:{exported}", folder, NAMES)
    assert 0.0 < metrics["accuracy"] < 1.0  # not a degenerate model: agreement means something
    assert top1 == pytest.approx(metrics["accuracy"])
    # The inherited test size (80 px, crop 1.0) would have scored other pixels.
    model = timm.create_model(f"local-dir:{exported}", pretrained=True)
    assert timm.data.resolve_model_data_config(model, use_test_size=True)["input_size"] == (3, 40, 40)


def test_base_weights_name_the_pretrained_source(tmp_path: Path) -> None:
    assert base_weights("test_resnet", pretrained=False) is None
    assert base_weights("tf_efficientnet_lite0", pretrained=True)["hub_id"] == "timm/tf_efficientnet_lite0.in1k"


@needs_lite0
def test_base_weights_of_a_local_folder_record_its_origin() -> None:
    info = base_weights("tf_efficientnet_lite0", pretrained_file=LITE0_WEIGHTS)
    assert info["name"] == LITE0_WEIGHTS.name
    assert info["origin_url"].startswith("https://")
    assert "hub_id" not in info  # that folder records no Hub id: none is made up


def _card_meta(model_dir: Path, info_update: dict) -> tuple[dict, str]:
    import yaml

    from derm_accel.hub.card import build_model_card

    path = model_dir / "training_info.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **info_update}))
    text = str(build_model_card(model_dir, "derm-lab/tiny", report_dir=model_dir.parent / "report"))
    return yaml.safe_load(text.split("---")[1]), text


def test_model_card_names_base_model_and_dataset(tmp_path: Path) -> None:
    from tests.hub_fixtures import write_model_dir, write_report_dir

    model_dir = write_model_dir(tmp_path)
    write_report_dir(tmp_path)
    meta, text = _card_meta(
        model_dir,
        {
            "base_model": {"hub_id": "timm/tf_efficientnet_lite0.in1k", "name": "tf_efficientnet_lite0"},
            "dataset": {"name": "derm-sample", "hub_id": "derm-lab/derm-sample"},
        },
    )
    assert meta["base_model"] == "timm/tf_efficientnet_lite0.in1k"
    assert meta["datasets"] == ["derm-lab/derm-sample"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"] == {"name": "derm-sample", "type": "derm-lab/derm-sample", "split": "test"}
    assert "(https://huggingface.co/timm/tf_efficientnet_lite0.in1k)" in text

    meta, text = _card_meta(
        model_dir,
        {"base_model": {"name": "efficientnet_lite0.in1k", "origin_url": "https://example.org/w"}, "dataset": {}},
    )
    assert "base_model" not in meta and "datasets" not in meta  # a local folder is no Hub id
    assert "local folder `efficientnet_lite0.in1k`, from https://example.org/w" in text
    meta, text = _card_meta(model_dir, {"base_model": None})
    assert "**Pretrained weights:** none (trained from scratch)" in text


def test_a_missing_local_path_is_no_hub_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derm_accel.models.load import resolve_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for source in ("./best", "../x/best", str(tmp_path / "nope"), "runs/best", "runs/exp1/best", "~/no-such-dir/"):
        with pytest.raises(FileNotFoundError, match="No such model folder"):
            resolve_model_source(source)
    assert resolve_model_source("derm-lab/effnet") == "hf-hub:derm-lab/effnet"
