"""Model creation, ImageNet weights and export in timm's Hub layout.

Every model derm-accel writes is a plain timm checkpoint folder (``model.safetensors`` + ``config.json``), so
``timm.create_model("local-dir:DIR", pretrained=True)`` or ``"hf-hub:ORG/NAME"`` loads it without derm-accel.
Weights are only ever read with safetensors: nothing downloaded is unpickled.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.data import DEFAULT_CROP_PCT, resolve_data_config
from timm.models import save_for_hf

from derm_accel.core.artifacts import CONFIG_NAME, WEIGHTS_NAME
from derm_accel.core.errors import InputError
from derm_accel.core.fileio import staged_dir
from derm_accel.models.tta import CONFIG_KEY


class PretrainedWeightsError(InputError):
    """Raised when ImageNet weights do not fit the requested architecture."""



def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Create a timm model with a fresh ``num_classes`` head, optionally on ImageNet weights.

    ``pretrained=True`` downloads timm's default weights through the Hub (cached, safetensors).
    ``pretrained_file`` is a local folder in timm's layout (or a single ``.safetensors`` file) for air-gapped
    sites: the backbone must load completely, and only the classifier is re-initialised.
    """
    model_kwargs: dict[str, Any] = dict(kwargs, num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:
        model_kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file is not None:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
        load_backbone_weights(model, pretrained_file)
        return model
    return timm.create_model(name, pretrained=pretrained, **model_kwargs)



def _weights_and_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        config_path = path / CONFIG_NAME
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    else:
        weights, config = path, {}
    if not weights.exists():
        raise FileNotFoundError(
            f"No weights at {weights}. Point pretrained_file at a folder holding {WEIGHTS_NAME} "
            f"(timm's Hub layout) or at a .safetensors file."
        )
    if weights.suffix != ".safetensors":
        raise PretrainedWeightsError(
            f"{weights} is not a .safetensors file; derm-accel never unpickles weights. "
            f"Convert it with safetensors.torch.save_file first."
        )
    return weights, config



def load_backbone_weights(model: Any, path: str | os.PathLike) -> None:
    """Load ImageNet weights into ``model`` (a timm model: its ``pretrained_cfg`` is read and replaced, which
    ``nn.Module``'s attribute types do not describe), re-initialising only its classifier; fail loudly otherwise."""
    weights, config = _weights_and_config(path)
    arch = config.get("architecture")
    model_arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if arch and model_arch and arch != model_arch:
        raise PretrainedWeightsError(
            f"{weights.parent} holds weights for '{arch}', but the model is '{model_arch}'. "
            f"Set model: {arch} in the recipe, or point pretrained_file at {model_arch} weights."
        )
    state = load_file(str(weights), device="cpu")
    classifier = model.default_cfg.get("classifier", "classifier")
    classifier_names = [classifier] if isinstance(classifier, str) else list(classifier)
    own = model.state_dict()
    head_keys = {k for k in own if any(k == c or k.startswith(c + ".") for c in classifier_names)}
    # The ImageNet head never fits a new label set: drop it, keep everything else.
    state = {k: v for k, v in state.items() if k not in head_keys}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise PretrainedWeightsError(
            f"{weights}: shapes differ for {len(mismatched)} tensors (first: {mismatched[0]}). "
            f"The weights belong to another architecture than {model_arch or type(model).__name__}."
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:
        raise PretrainedWeightsError(
            f"{weights} does not fit {model_arch or type(model).__name__}: "
            f"{len(missing)} missing backbone keys {missing[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}."
        )
    # Preprocessing must follow the weights (e.g. mean/std 0.5 for TF EfficientNet-Lite).
    source_cfg = config.get("pretrained_cfg", {})
    if source_cfg:
        merged = dict(model.pretrained_cfg)
        for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"):
            if key in source_cfg:
                merged[key] = source_cfg[key]
        model.pretrained_cfg = merged
        model.default_cfg = merged



def base_weights(
    name: str, *, pretrained: bool = False, pretrained_file: str | os.PathLike | None = None
) -> dict[str, Any] | None:
    """Where a model's starting weights came from, for the model card's ``base_model``; None when from scratch.

    timm's own weights name their Hub repo (``timm/ARCH.TAG``). A local folder names what its ``config.json``
    records: a Hub id when it has one, else its folder name, tag and ``origin_url``.
    """
    if pretrained_file is not None:
        path = Path(pretrained_file)
        cfg = _weights_and_config(path)[1].get("pretrained_cfg", {}) if path.exists() else {}
        info = {"hub_id": cfg.get("hf_hub_id"), "name": path.name, "tag": cfg.get("tag")}
        info["origin_url"] = cfg.get("origin_url")
        return {k: v for k, v in info.items() if v}
    if not pretrained:
        return None
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return {"hub_id": hub_id, "name": name} if hub_id else {"name": name}



# pretrained_cfg keys that describe the ImageNet source weights, not the exported model.
INHERITED_CFG_KEYS = (
    "url", "file", "hf_hub_id", "hf_hub_filename", "source", "tag", "license", "origin_url", "description",
    "paper_name", "paper_ids", "notes", "label_offset", "label_descriptions", "pool_size", "test_pool_size",
)



def honest_pretrained_cfg(pretrained_cfg: dict[str, Any], *, license: str | None = None) -> dict[str, Any]:
    """``pretrained_cfg`` as the exported model's own: no ImageNet tag, license, origin or Hub id, and the test
    preprocessing equal to the one training validated with and evaluate uses (``test_input_size`` =
    ``input_size``, ``test_crop_pct`` = ``crop_pct``), so timm's ``resolve_model_data_config(use_test_size=True)``
    and validate.py preprocess like derm-accel does."""
    cfg = {k: v for k, v in pretrained_cfg.items() if k not in INHERITED_CFG_KEYS}
    cfg["crop_pct"] = cfg.get("crop_pct") or DEFAULT_CROP_PCT
    cfg["test_input_size"] = list(cfg["input_size"])
    cfg["test_crop_pct"] = cfg["crop_pct"]
    if license:
        cfg["license"] = license
    return cfg



def data_config(model: Any) -> dict[str, Any]:
    """The preprocessing a model expects (input size, crop_pct, interpolation, mean, std), with its colour
    constancy (``color_constancy``: the model's ``config.json`` ``derm_accel.color_constancy``) when it has one."""
    cfg = resolve_data_config({}, model=model)
    spec = getattr(model, "color_constancy", None)
    if spec:
        cfg["color_constancy"] = dict(spec)
    return cfg


def declared_color_constancy(config: dict[str, Any]) -> dict[str, Any] | None:
    """The colour constancy a model's ``config.json`` declares (``derm_accel.color_constancy``), or None.

    Returned as written; :mod:`derm_accel.data.color` checks it when building the step, so a model that
    declares a method this version lacks fails with a message rather than being preprocessed wrongly."""
    spec = (config.get(CONFIG_KEY) or {}).get("color_constancy")
    return dict(spec) if isinstance(spec, dict) else spec



def export_model(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    label_names: Sequence[str],
    *,
    extra_files: dict[str, str | bytes] | None = None,
    license: str | None = None,
    tta: str | None = None,
    color_constancy: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` in timm's Hub layout, atomically: a reader never sees half a folder.

    ``config.json`` describes the trained model only (:func:`honest_pretrained_cfg`), with ``license`` as its
    license when given, ``tta`` (:mod:`derm_accel.models.tta`) as the test-time augmentation it answers with and
    ``color_constancy`` (:mod:`derm_accel.data.color`) as the colour step its images get before timm's transform.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if any(not p.is_contiguous() or p.device.type != "cpu" for p in model.parameters()):
        # safetensors refuses channels_last (non-contiguous) tensors; never touch the caller's training copy.
        model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    if len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names for a model with {model.num_classes} classes")
    with staged_dir(out_dir) as tmp:
        save_for_hf(
            model,
            str(tmp),
            model_config={"label_names": list(label_names)},
            safe_serialization=True,
        )
        cfg_path = tmp / CONFIG_NAME
        config = json.loads(cfg_path.read_text())
        # timm keeps pretrained_cfg keys it knows; make sure label names also live there for pipelines.
        config["pretrained_cfg"] = honest_pretrained_cfg(config.get("pretrained_cfg", {}), license=license)
        config["pretrained_cfg"]["num_classes"] = model.num_classes
        config["pretrained_cfg"]["label_names"] = list(label_names)
        if tta is not None:
            config[CONFIG_KEY] = {**config.get(CONFIG_KEY, {}), "tta": tta}
        if color_constancy:
            config[CONFIG_KEY] = {**config.get(CONFIG_KEY, {}), "color_constancy": dict(color_constancy)}
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return out_dir

