"""The model card: Hub metadata, model-index, required sections, license resolution, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from derm_accel.hub.card import MissingLicenseError, build_model_card, resolve_license
from tests.hub_fixtures import ARCH, LABELS, write_model_dir, write_report_dir

REPO_ID = "derm-lab/tiny-derm"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    return write_model_dir(root), write_report_dir(root)


def _meta(card: ModelCard) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


def test_card_metadata_and_model_index(artifacts: tuple[Path, Path]) -> None:
    model_dir, report_dir = artifacts
    card = build_model_card(model_dir, REPO_ID, report_dir=report_dir)
    meta = _meta(card)
    assert meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "cc-by-nc-4.0"
    assert {"dermatology", "medical", "timm", "image-classification"} <= set(meta["tags"])
    assert {"accuracy", "f1", "roc_auc"} <= set(meta["metrics"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "tiny-derm"
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"]["split"] == "test"
    values = {m["name"]: m["value"] for m in result["metrics"]}
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert values["Accuracy"] == pytest.approx(metrics["accuracy"])
    assert values["Macro F1"] == pytest.approx(metrics["macro_f1"])
    assert values["ROC AUC (macro, one-vs-rest)"] == pytest.approx(metrics["roc_auc_macro"])
    assert values["Expected calibration error"] == pytest.approx(metrics["ece"])
    # huggingface_hub reads its own model-index back.
    reloaded = ModelCard(str(card))
    assert {r.metric_type for r in reloaded.data.eval_results} >= {"accuracy", "f1", "roc_auc"}


def test_card_sections(artifacts: tuple[Path, Path]) -> None:
    model_dir, report_dir = artifacts
    text = str(build_model_card(model_dir, REPO_ID, report_dir=report_dir))
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Model details",
        "## Intended use",
        "## Training data",
        "## Training procedure",
        "## Evaluation",
        "## Out-of-domain inputs and abstention",
        "## Limitations and bias",
        "## How to use",
        "## Citation",
    ]
    assert "### Out-of-scope use" in text and "not a medical device and gives no diagnosis" in text
    assert "### How the split kept duplicates apart" in text
    assert "This model has no domain guard" in text  # this fixture's model has none: the card says so
    # Training procedure from training_info.json.
    for needle in (
        "| Mixed precision | bf16 |",
        "| Hardware | NVIDIA H100 80GB HBM3 |",
        "| Processes | 2 |",
        "| Epochs | 3 |",
        "| Throughput (train images/s) | 1234.5 |",
        "| Learning rate | 0.001 |",
    ):
        assert needle in text
    # The dataset is named, but the user's directory layout is not published.
    assert "- **Dataset:** derm" in text and str(model_dir.parent) not in text
    # Evaluation: per-class table, confusion matrix, calibration.
    assert "| melanoma | 0.610 | 0.580 | 0.595 | 0.880 | 40 |" in text
    assert "![Confusion matrix](eval/confusion_matrix.png)" in text
    assert "### Calibration" in text and "temperature: 1.310" in text
    assert "| ece | 0.073 | 0.041 |" in text
    assert "0.784 (95% CI 0.720-0.840)" in text
    # Limitations and usage snippets.
    assert "Skin-tone coverage is unknown" in text and "Dermoscopic and clinical photos differ" in text
    assert f'timm.create_model("hf-hub:{REPO_ID}", pretrained=True)' in text
    assert f'predict("lesion.jpg", model="{REPO_ID}"' in text
    assert f"derm-accel predict lesion.jpg photos/ --model {REPO_ID}" in text
    assert f"`{ARCH}`" in text and all(f"`{n}`" in text for n in LABELS)


def test_card_is_deterministic(artifacts: tuple[Path, Path]) -> None:
    model_dir, report_dir = artifacts
    a = str(build_model_card(model_dir, REPO_ID, report_dir=report_dir))
    b = str(build_model_card(model_dir, REPO_ID, report_dir=report_dir))
    assert a == b  # re-pushing the same run uploads the same README, so no new commit


def test_card_without_report_has_no_model_index(artifacts: tuple[Path, Path]) -> None:
    model_dir, _ = artifacts
    card = build_model_card(model_dir, REPO_ID)
    assert "model-index" not in _meta(card)
    assert "No evaluation report was published" in str(card)


def test_license_resolution_order() -> None:
    recipe = {"license": "mit", "dataset": {"license": "cc0-1.0"}}
    assert resolve_license("apache-2.0", recipe, {"license": "cc-by-4.0"}) == "apache-2.0"
    assert resolve_license(None, recipe, {"license": "cc-by-4.0"}) == "mit"
    assert resolve_license(None, {}, {"license": "cc-by-4.0"}) == "cc-by-4.0"
    assert resolve_license(None, {}, {"dataset": {"name": "derm", "license": "cc-by-nc-4.0"}}) == "cc-by-nc-4.0"
    with pytest.raises(MissingLicenseError, match="--license"):
        resolve_license(None, {"data": {"path": "data/derm"}}, {"dataset": "data/derm"})


def test_missing_license_is_an_error_not_a_default(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path, license=None)
    # The ImageNet weights' license is not carried into the export, and none is made up.
    assert "license" not in json.loads((model_dir / "config.json").read_text())["pretrained_cfg"]
    with pytest.raises(MissingLicenseError, match="--license"):
        build_model_card(model_dir, REPO_ID)
    assert _meta(build_model_card(model_dir, REPO_ID, license="CC-BY-4.0"))["license"] == "cc-by-4.0"
    custom = _meta(build_model_card(model_dir, REPO_ID, license="Clinic Research License v2"))
    assert custom["license"] == "other" and custom["license_name"] == "clinic-research-license-v2"


def test_incomplete_timm_config_is_rejected(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, _ = artifacts
    config = json.loads((model_dir / "config.json").read_text())
    del config["pretrained_cfg"]["mean"]
    del config["num_features"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json lacks num_features, pretrained_cfg.mean"):
        build_model_card(tmp_path, REPO_ID, license="mit")
