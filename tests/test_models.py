"""Model creation, local ImageNet weights, export in timm's layout, and safetensors-only loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from derm_accel.models.build import PretrainedWeightsError, create_model, export_model
from derm_accel.models.load import load_model, resolve_model_source
from tests.conftest import LITE0_WEIGHTS, needs_lite0

LABELS = ["melanoma", "nevus", "psoriasis"]


def test_export_is_plain_timm_and_survives_channels_last(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("test_resnet", len(LABELS)).eval().to(memory_format=torch.channels_last)
    out = export_model(model, tmp_path / "best", LABELS)
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == LABELS == config["pretrained_cfg"]["label_names"]
    assert config["num_classes"] == 3 and config["architecture"] == "test_resnet"
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert not list(tmp_path.glob(".best.*"))  # no temporary folder left behind


def test_export_refuses_wrong_label_count(tmp_path: Path) -> None:
    model = create_model("test_resnet", 3)
    with pytest.raises(ValueError, match="2 label names for a model with 3 classes"):
        export_model(model, tmp_path / "best", LABELS[:2])
    assert not (tmp_path / "best").exists()


def test_load_model_reads_only_safetensors(tmp_path: Path) -> None:
    model = create_model("test_resnet", 3)
    out = export_model(model, tmp_path / "best", LABELS)
    loaded, labels = load_model(str(out))
    assert labels == LABELS and not loaded.training
    # A folder whose weights are a pickle is refused, never unpickled.
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never pickled"):
        load_model(str(out))


def test_model_source_resolution(tmp_path: Path) -> None:
    assert resolve_model_source("org/name") == "hf-hub:org/name"
    assert resolve_model_source("hf-hub:org/name@v1") == "hf-hub:org/name@v1"
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model_source(str(tmp_path / "m"))


def test_pretrained_file_must_be_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not really a pickle")
    with pytest.raises(PretrainedWeightsError, match="never unpickles"):
        create_model("test_resnet", 3, pretrained_file=bad)


def test_pretrained_file_with_missing_backbone_keys_fails_loudly(tmp_path: Path) -> None:
    state = create_model("test_resnet", 3).state_dict()
    state.pop(next(k for k in state if k.startswith("conv1") or k.startswith("stem")))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="missing backbone keys"):
        create_model("test_resnet", 5, pretrained_file=tmp_path / "w.safetensors")


@needs_lite0
def test_real_imagenet_weights_load_with_a_new_head() -> None:
    model = create_model("tf_efficientnet_lite0", 9, pretrained_file=LITE0_WEIGHTS)
    assert model.num_classes == 9
    assert model.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]  # preprocessing follows the weights' config
    weights = load_file(str(LITE0_WEIGHTS / "model.safetensors"))
    torch.testing.assert_close(model.conv_stem.weight, weights["conv_stem.weight"])
    with pytest.raises(PretrainedWeightsError, match="holds weights for 'tf_efficientnet_lite0'"):
        create_model("efficientnet_b0", 9, pretrained_file=LITE0_WEIGHTS)
