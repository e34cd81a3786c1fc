"""Recipes: YAML loading, --set overrides with type coercion, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from derm_accel.training.config import Recipe, RecipeError, load_recipe, parse_override

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["effnet_b3", "effnet_b3_plus", "densenet121", "smoke"])
def test_shipped_recipes_are_valid(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.output_dir.startswith("runs/")
    # Every key the file sets is a real key (no silently ignored typo), and the file round-trips.
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert load_recipe(yaml.safe_load(recipe.to_yaml())) == recipe
    assert set(raw) <= set(recipe.to_dict())


def test_original_study_recipe_has_no_extras() -> None:
    r = load_recipe(RECIPES / "effnet_b3.yaml")
    assert (r.optim.name, r.optim.lr, r.optim.schedule, r.optim.warmup_epochs) == (
        "adam",
        1e-3,
        "constant",
        0,
    )
    assert (r.data.batch_size, r.data.image_size, r.train.epochs) == (64, 224, 5)
    assert r.optim.label_smoothing == 0 and not r.optim.ema and r.data.balance == "none"
    plus = load_recipe(RECIPES / "effnet_b3_plus.yaml")
    assert plus.optim.ema and plus.model.tta == "flip" and plus.train.mixed_precision == "bf16"
    assert r.model.tta is None  # the original study's recipe answers from the single view


def test_overrides_are_coerced_to_the_field_types() -> None:
    r = load_recipe(
        RECIPES / "smoke.yaml",
        [
            "optim.lr=1e-4",  # YAML 1.1 reads this as a string
            "data.batch_size=32",
            "data.augment.scale=[0.5, 1]",
            "train.mixed_precision=bf16",
            "model.pretrained_file=null",
            "model.pretrained=true",
            "data.image_size=96",
            "train.max_steps_per_epoch=null",
            "optim.grad_clip=0",
            "output_dir=runs/x",
            "license=cc-by-nc-4.0",
        ],
    )
    assert r.optim.lr == 1e-4 and isinstance(r.optim.lr, float)
    assert r.data.batch_size == 32 and r.data.augment.scale == (0.5, 1.0)
    assert isinstance(r.data.augment.scale[1], float)
    assert r.train.mixed_precision == "bf16" and r.model.pretrained is True and r.model.pretrained_file is None
    assert r.data.image_size == 96 and r.train.max_steps_per_epoch is None and r.optim.grad_clip == 0.0
    assert (r.output_dir, r.license) == ("runs/x", "cc-by-nc-4.0")
    assert load_recipe(r, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML `no` is False


def test_defaults_without_a_file() -> None:
    r = load_recipe(None)
    assert r == Recipe() and r.data.augment.vflip == 0.5 and r.train.mixed_precision is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown key 'optim\.lrr'\. Did you mean 'optim\.lr'\?"),
        ("trian.epochs=1", r"unknown key 'trian'\. Did you mean 'train'\?"),
        ("optim.lr=fast", r"optim\.lr must be a number, got 'fast'"),
        ("data.batch_size=1.5", r"data\.batch_size must be an integer"),
        ("data.batch_size=0", r"data\.batch_size must be at least 1"),
        ("train.channels_last=maybe", r"train\.channels_last must be true or false"),
        ("data.balance=oversample", r"data\.balance must be one of none, weighted_loss, sampler"),
        ("optim.name=sgd", r"optim\.name must be one of adam, adamw"),
        ("train.mixed_precision=fp8", r"train\.mixed_precision must be null"),
        ("data.augment.scale=[0.5]", r"data\.augment\.scale must be a list of 2 numbers"),
        ("data.augment.scale=[0.9, 0.5]", r"data\.augment\.scale must satisfy"),
        ("model.pretrained=true", r"model\.pretrained and model\.pretrained_file are both set"),
        ("optim.label_smoothing=1", r"optim\.label_smoothing must be in \[0, 1\)"),
        ("data=3", r"'data' must be a section"),
        ("optim.lr.x=1", r"'lr' is a value, not a section"),
        ("guard.max_fit_images=5", r"guard\.max_fit_images must be at least 20"),
        ("guard.target_coverage=0", r"guard\.target_coverage is a share in \(0, 1\]"),
        ("guard.target_error=1.5", r"guard\.target_error is an error rate in \(0, 1\), or null"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    base = ["model.pretrained_file=/w"] if override.startswith("model.pretrained=") else []
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "smoke.yaml", [*base, override])


def test_override_syntax_and_file_errors(tmp_path: Path) -> None:
    assert parse_override("optim.lr=3e-4") == ("optim.lr", "3e-4")
    assert parse_override("data.augment.scale=[0.5, 1.0]") == ("data.augment.scale", [0.5, 1.0])
    with pytest.raises(RecipeError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(FileNotFoundError, match=r"recipes/smoke\.yaml"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml is not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(RecipeError, match=r"typo\.yaml: unknown key 'optim\.learning_rate'"):
        load_recipe(typo)


def test_guard_defaults_answer_a_share_and_bound_the_fit_sample() -> None:
    g = load_recipe(RECIPES / "smoke.yaml").guard
    assert (g.target_coverage, g.target_error, g.max_fit_images) == (0.8, None, 5000)
    g = load_recipe(RECIPES / "smoke.yaml", ["guard.target_error=0.05", "guard.max_fit_images=800"]).guard
    assert (g.target_error, g.max_fit_images) == (0.05, 800)
