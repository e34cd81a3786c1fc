"""Colour constancy (Shades of Gray): what it does to pixels, how a recipe declares it, and that every path that
feeds a model (train, evaluate, predict, serve, demo, ONNX export, plain timm with the card's lines) applies it
identically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from derm_accel.core.errors import InputError
from derm_accel.data.color import (
    ColorConstancy,
    color_constancy_spec,
    color_constancy_step,
    numpy_snippet,
    shades_of_gray,
)
from derm_accel.data.synthetic import render

SOG = {"method": "shades_of_gray", "power": 6.0}
LABELS = ["melanoma", "nevus", "psoriasis"]


def _cast(image: Image.Image, gains: tuple[float, float, float] = (1.25, 0.8, 0.95)) -> Image.Image:
    """``image`` under a coloured illuminant (channel gains), as another dermatoscope would show it."""
    x = np.asarray(image.convert("RGB"), np.float32) * np.array(gains, np.float32)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _pnorm(x: torch.Tensor, p: float = 6.0) -> torch.Tensor:
    return (x.float() / 255).pow(p).mean(dim=(-2, -1)).pow(1 / p)


@pytest.fixture(scope="module")
def lesion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square JPEG with a red cast (so resizing, cropping and the colour step all matter)."""
    image = _cast(render(1, 4, 96).resize((96, 72)))
    path = tmp_path_factory.mktemp("img") / "cast.jpg"
    image.save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny model exported twice: without colour constancy and declaring Shades of Gray."""
    from derm_accel.models.build import create_model, export_model

    torch.manual_seed(0)
    net = create_model("test_efficientnet", len(LABELS))
    net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, 64, 64))
    root = tmp_path_factory.mktemp("cc")
    return export_model(net, root / "plain", LABELS), export_model(net, root / "sog", LABELS, color_constancy=SOG)


# ----------------------------------------------------------------------------------------------- the pixels
def test_shades_of_gray_makes_the_illuminant_gray_and_leaves_a_gray_one_alone() -> None:
    image = _tensor(render(0, 1, 64))
    cast = _tensor(_cast(render(0, 1, 64)))
    norms = _pnorm(cast)
    assert float(norms.max() / norms.min()) > 1.3  # the cast is there
    corrected = shades_of_gray(cast)
    assert corrected.dtype == torch.uint8 and corrected.shape == cast.shape
    norms = _pnorm(corrected)
    assert float(norms.max() / norms.min()) < 1.03  # the illuminant estimate is (nearly) gray afterwards
    # Colour constancy undoes a global cast: the cast and the original image come out with the same colours
    # (the overall brightness may differ: only the illuminant's direction is normalised).
    def chroma(x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean(dim=(-2, -1))
        return m / m.sum()

    assert (chroma(cast) - chroma(image)).abs().max() > 0.03
    assert (chroma(corrected) - chroma(shades_of_gray(image))).abs().max() < 0.005
    gray = torch.full((3, 8, 8), 120, dtype=torch.uint8)
    assert torch.equal(shades_of_gray(gray), gray)


def test_a_batch_is_corrected_image_by_image_and_black_stays_black() -> None:
    batch = torch.stack([_tensor(_cast(render(i, 2, 48), g)) for i, g in ((0, (1.2, 1, 0.8)), (1, (0.7, 1, 1.3)))])
    together = shades_of_gray(batch)
    assert torch.equal(together[0], shades_of_gray(batch[0])) and torch.equal(together[1], shades_of_gray(batch[1]))
    black = torch.zeros((3, 4, 4), dtype=torch.uint8)
    assert torch.equal(shades_of_gray(black), black)
    with pytest.raises(ValueError, match="uint8 RGB"):
        shades_of_gray(batch.float())


def test_the_step_keeps_pil_images_pil_and_tensors_tensors() -> None:
    step = ColorConstancy(SOG)
    image = _cast(render(2, 3, 40))
    out = step(image)
    assert isinstance(out, Image.Image) and out.size == image.size
    assert torch.equal(_tensor(out), step(_tensor(image)))
    assert "power=6" in repr(step)


def test_the_numpy_lines_give_the_same_pixels() -> None:
    image = _cast(render(1, 5, 64))
    scope = {"np": np, "Image": Image, "image": image}
    exec(numpy_snippet(SOG, "image"), scope)
    diff = np.abs(np.asarray(scope["image"], np.int16) - shades_of_gray(_tensor(image)).permute(1, 2, 0).numpy())
    assert diff.max() <= 1


# ----------------------------------------------------------------------------------------- declaring it
def test_specs_are_checked_with_the_key_named() -> None:
    assert color_constancy_spec(None) is None and color_constancy_spec("none") is None
    assert color_constancy_spec("shades_of_gray", 4) == {"method": "shades_of_gray", "power": 4.0}
    with pytest.raises(InputError, match=r"data\.color_constancy: unknown colour constancy 'grayworld'"):
        color_constancy_spec("grayworld", where="data.color_constancy")
    with pytest.raises(InputError, match="power must be a number from 1"):
        color_constancy_spec("shades_of_gray", 0)
    with pytest.raises(InputError, match="upgrade derm-accel"):
        color_constancy_step({"color_constancy": {"method": "retinex", "power": 6}})
    assert color_constancy_step({}) is None


def test_a_recipe_declares_it_and_rejects_bad_values() -> None:
    from derm_accel.training.config import RecipeError, load_recipe
    from derm_accel.training.setup import recipe_color_constancy

    recipe = load_recipe(None, ["data.color_constancy=shades_of_gray", "data.color_constancy_power=4"])
    assert recipe_color_constancy(recipe) == {"method": "shades_of_gray", "power": 4.0}
    assert recipe_color_constancy(load_recipe(None)) is None
    with pytest.raises(RecipeError, match=r"data\.color_constancy"):
        load_recipe(None, ["data.color_constancy=grey"])
    with pytest.raises(RecipeError, match="color_constancy_power"):
        load_recipe(None, ["data.color_constancy=shades_of_gray", "data.color_constancy_power=0.5"])


def test_export_records_it_and_load_reads_it(folders: tuple[Path, Path]) -> None:
    from derm_accel.models.build import data_config
    from derm_accel.models.load import load_model

    plain, sog = folders
    assert json.loads((sog / "config.json").read_text())["derm_accel"]["color_constancy"] == SOG
    assert "derm_accel" not in json.loads((plain / "config.json").read_text())
    assert data_config(load_model(str(sog))[0])["color_constancy"] == SOG
    assert "color_constancy" not in data_config(load_model(str(plain))[0])


def test_training_records_the_recipe_s_colour_constancy(tmp_path: Path) -> None:
    from derm_accel.models.build import data_config
    from derm_accel.models.load import load_model
    from derm_accel.training.train import train
    from tests.train_utils import make_dataset, tiny_recipe

    recipe = tiny_recipe(make_dataset(tmp_path / "data"), tmp_path / "run", train={"epochs": 1})
    recipe["data"]["color_constancy"] = "shades_of_gray"
    recipe["guard"] = {"enabled": False}
    run = Path(train(recipe))
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["derm_accel"]["color_constancy"] == SOG
    assert data_config(load_model(str(run / "best"))[0])["color_constancy"] == SOG


# ------------------------------------------------------------------------------ every path, the same pixels
def _reference(path: Path, model_dir: Path) -> torch.Tensor:
    """What the model must see: Shades of Gray on the whole image, then timm's own eval transform."""
    from timm.data import create_transform, resolve_data_config

    from derm_accel.models.load import load_model

    net, _ = load_model(str(model_dir))
    timm_eval = create_transform(**resolve_data_config({}, model=net))
    image = Image.open(path).convert("RGB")
    corrected = Image.fromarray(shades_of_gray(_tensor(image)).permute(1, 2, 0).numpy())
    return timm_eval(corrected)


def test_predict_evaluate_and_training_transforms_preprocess_alike(folders: tuple[Path, Path], lesion: Path) -> None:
    from derm_accel.data.transforms import AugmentConfig, BatchNormalize, eval_input, train_transform
    from derm_accel.inference.predict import prepared_model
    from derm_accel.models.build import data_config

    plain, sog = folders
    reference = _reference(lesion, sog)
    prepared = prepared_model(str(sog), "cpu", guard=False)  # predict, serve and the demo
    predicted = prepared.transform(Image.open(lesion).convert("RGB"))
    assert torch.equal(predicted, reference)
    cfg = data_config(prepared.net)
    transform, decode = eval_input(cfg)  # evaluate, validation during training, guard fitting
    evaluated = BatchNormalize(cfg)(transform(decode({"bytes": lesion.read_bytes()}, None)).unsqueeze(0))[0]
    std = torch.tensor(cfg["std"]).view(-1, 1, 1)
    assert ((evaluated - reference) * std * 255).abs().max() <= 2.5  # torch vs Pillow resizing, as without it
    # Training: the first step corrects the whole image; a full-frame crop of a square image is then its resize.
    aug = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0)
    square = _tensor(_cast(render(0, 9, 80)))
    trained = train_transform(cfg, aug, normalize=False)(square)
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(shades_of_gray(square), [64, 64], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(trained, resized)
    # The same paths for the plain model see the cast: the test would notice a path that skipped the step.
    plain_seen = prepared_model(str(plain), "cpu", guard=False).transform(Image.open(lesion).convert("RGB"))
    assert ((plain_seen - reference) * std * 255).abs().mean() > 5


def test_serve_and_the_demo_answer_like_predict(folders: tuple[Path, Path], lesion: Path) -> None:
    from fastapi.testclient import TestClient

    from derm_accel.inference.predict import predict
    from derm_accel.serving.demo import DemoModel
    from derm_accel.serving.serve import create_app

    plain, sog = folders
    expected = predict(str(lesion), model=str(sog), top_k=3, device="cpu", guard=False)[0]
    assert expected["top_k"] != predict(str(lesion), model=str(plain), top_k=3, device="cpu", guard=False)[0]["top_k"]
    with TestClient(create_app(str(sog), top_k=3)) as client:
        served = client.post("/predict", content=lesion.read_bytes(), headers={"content-type": "image/jpeg"}).json()
    shown, x = DemoModel(str(sog), device="cpu").classify(str(lesion))
    assert torch.equal(x, _reference(lesion, sog))
    for answer in (served, shown):
        got = {t["label"]: t["probability"] for t in answer["top_k"]}
        assert [got[t["label"]] for t in expected["top_k"]] == pytest.approx(
            [t["probability"] for t in expected["top_k"]], abs=1e-6
        )


def test_onnx_export_records_it_and_its_backend_applies_it(folders: tuple[Path, Path], lesion: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra")
    from derm_accel.inference.predict import predict
    from derm_accel.models.onnx import SIDECAR_NAME, export_onnx

    _, sog = folders
    out = export_onnx(sog, tmp_path / "onnx")
    meta = json.loads((out / SIDECAR_NAME).read_text())
    assert meta["color_constancy"] == SOG and "shades_of_gray colour constancy" in meta["preprocessing_note"]
    via_torch = predict(str(lesion), model=str(sog), top_k=3, device="cpu", guard=False)[0]
    via_onnx = predict(str(lesion), model=str(out), top_k=3, backend="onnxruntime")[0]
    p_onnx = {t["label"]: t["probability"] for t in via_onnx["top_k"]}
    assert max(abs(t["probability"] - p_onnx[t["label"]]) for t in via_torch["top_k"]) <= 1e-4


def test_plain_timm_with_the_card_s_lines_matches_derm_accel(folders: tuple[Path, Path], lesion: Path) -> None:
    import timm

    from derm_accel.hub.card import build_model_card
    from derm_accel.inference.predict import predict

    plain, sog = folders
    card = str(build_model_card(sog, "derm-lab/sog", license="apache-2.0")).split("## How to use")[1]
    assert "Shades Of Gray colour constancy" in card and "derm_accel.color_constancy" in card
    plain_card = str(build_model_card(plain, "derm-lab/plain", license="apache-2.0"))
    assert "colour constancy" not in plain_card.split("## How to use")[1]
    snippet = card.split("```python\n")[1].split("```")[0]
    model = timm.create_model(f"local-dir:{sog}", pretrained=True)
    code = snippet.replace('"hf-hub:derm-lab/sog"', f'"local-dir:{sog}"').replace('"lesion.jpg"', repr(str(lesion)))
    scope: dict = {}
    exec(code, scope)  # the card's own code, run as a user would
    expected = predict(str(lesion), model=str(sog), top_k=3, device="cpu", guard=False, tta="none")[0]
    labels = model.pretrained_cfg["label_names"]
    got = dict(zip(labels, scope["probs"].tolist(), strict=True))
    for t in expected["top_k"]:
        assert got[t["label"]] == pytest.approx(t["probability"], abs=2e-3)  # the numpy lines round like torch


def test_an_ensemble_refuses_members_that_preprocess_colours_differently(folders: tuple[Path, Path]) -> None:
    from derm_accel.hub.ensemble import check_compatible
    from derm_accel.models.ensemble import EnsembleError, load_models

    plain, sog = folders
    with pytest.raises(EnsembleError, match="color_constancy"):
        load_models([str(plain), str(sog)])
    with pytest.raises(EnsembleError, match="color_constancy"):
        check_compatible([plain, sog])

