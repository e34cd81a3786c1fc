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

from derm_accel.errors import InputError
from derm_accel.fileio import staged_dir
from derm_accel.tta import declared_tta

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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


def load_backbone_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load ImageNet weights into ``model``, re-initialising only its classifier; fail loudly otherwise."""
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


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """The preprocessing a model expects (input size, crop_pct, interpolation, mean, std)."""
    return resolve_data_config({}, model=model)


def export_model(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    label_names: Sequence[str],
    *,
    extra_files: dict[str, str | bytes] | None = None,
    license: str | None = None,
    tta: str | None = None,
) -> Path:
    """Write ``model`` in timm's Hub layout, atomically: a reader never sees half a folder.

    ``config.json`` describes the trained model only (:func:`honest_pretrained_cfg`), with ``license`` as its
    license when given, and ``tta`` (:mod:`derm_accel.tta`) as the test-time augmentation it answers with.
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
            tmp,
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
            config["derm_accel"] = {**config.get("derm_accel", {}), "tta": tta}
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return out_dir


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The timm ``config.json`` of an exported model folder."""
    return json.loads((Path(model_dir) / CONFIG_NAME).read_text())


def resolve_model_source(source: str) -> str:
    """Turn a user's model argument into a timm model name.

    A local folder becomes ``local-dir:PATH``; ``hf-hub:ORG/NAME`` and ``local-dir:`` pass through; any other
    ``ORG/NAME`` is a Hub repo.
    """
    if source.startswith(("hf-hub:", "local-dir:")):
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).exists():
            raise FileNotFoundError(
                f"{path} has no {CONFIG_NAME}; expected a model folder such as RUN/best written by `derm-accel train`."
            )
        return f"local-dir:{path.resolve()}"
    if looks_like_path(source):
        raise FileNotFoundError(
            f"No such model folder: {source} ({_nearest_existing(path)} exists, the rest does not). Check the "
            f"path; a Hub model is named ORG/NAME with no leading ./, ../, / or ~."
        )
    if source.count("/") == 1 and not path.exists():
        return f"hf-hub:{source}"
    raise FileNotFoundError(
        f"Model '{source}' is neither a model folder nor a Hub repo id (ORG/NAME)."
    )


def looks_like_path(source: str) -> bool:
    """Whether a model argument names a local path rather than a Hub id: it starts with ./, ../, / or ~, has
    more than one separator, ends in one, uses the OS's own separator, or its first part is an existing folder
    (``runs/best`` while ``runs/`` exists). Such an argument never becomes a Hub lookup."""
    if source.startswith(("./", "../", "/", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    if source.count("/") > 1 or source.endswith("/") or (os.sep != "/" and os.sep in source):
        return True
    return "/" in source and Path(source.split("/", 1)[0]).is_dir()


def _nearest_existing(path: Path) -> str:
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    return str(parent)


def split_hub_id(source: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME@REV`` or ``ORG/NAME`` -> ``("ORG/NAME", "REV")``, the revision None when not given."""
    repo_id, _, revision = source.removeprefix("hf-hub:").partition("@")
    return repo_id, revision or None


def ensure_hub_safetensors(hub_id: str) -> Path:
    """The local path of the repo's ``model.safetensors`` (downloaded, or from the cache); a clear error if absent.

    A repo with only a pickled ``pytorch_model.bin`` is refused: derm-accel never unpickles downloads.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_hub_id(hub_id)
    try:
        return Path(hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision))
    except LocalEntryNotFoundError as e:  # checked first: it is also an EntryNotFoundError
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE is set "
            f"or the network is down). Load it once while online, or point --model at a local model folder."
        ) from e
    except RemoteEntryNotFoundError as e:
        raise FileNotFoundError(
            f"Hub repo {repo_id} has no {WEIGHTS_NAME}; derm-accel loads weights only from safetensors. "
            f"Publish the model with `derm-accel push`."
        ) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id} has no revision '{revision}'.") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"Hub repo {repo_id} not found (or private: set HF_TOKEN or run `hf auth login`)."
        ) from e


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_model_folder(model_dir: str | os.PathLike) -> None:
    """Refuse a model folder that would not load for others: ``config.json``'s architecture must take
    ``model.safetensors`` exactly (same keys, same shapes), every weight must be finite, the label names must
    match the classifier, and one forward pass must give finite logits. Raises ``ValueError`` saying which."""
    model_dir = Path(model_dir)
    weights, config_path = model_dir / WEIGHTS_NAME, model_dir / CONFIG_NAME
    arch = read_config(model_dir).get("architecture")
    try:
        model = timm.create_model(f"local-dir:{model_dir.resolve()}", pretrained=False)
    except Exception as e:
        raise ValueError(f"{config_path}: timm cannot build architecture {arch!r} from it ({e}).") from e
    state = load_file(str(weights), device="cpu")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state
              and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{weights} does not fit the architecture {arch!r} that {config_path} names: {len(missing)} missing "
            f"keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape "
            f"mismatches {shapes[:3]}. Export the weights and config together (RUN/best from `derm-accel train`)."
        )
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(
            f"{weights}: {len(bad)} tensors hold NaN or inf (first: {bad[0]}); the training diverged. Publish "
            f"a checkpoint with finite weights."
        )
    model.load_state_dict(state, strict=True)
    labels = model.pretrained_cfg.get("label_names") or []
    if labels and len(labels) != model.num_classes:
        raise ValueError(f"{config_path}: {len(labels)} label_names for a model with {model.num_classes} classes.")
    size = tuple(data_config(model)["input_size"])
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, *size))
    if tuple(logits.shape) != (1, model.num_classes) or not bool(torch.isfinite(logits).all()):
        raise ValueError(
            f"{model_dir}: a forward pass on one {size} input gives logits of shape {tuple(logits.shape)} "
            f"(finite: {bool(torch.isfinite(logits).all())}), not {model.num_classes} finite values."
        )


def _config_beside(weights: Path, name: str) -> dict[str, Any]:
    """The config.json next to the weights (the Hub snapshot holds both; timm fetched it to build the model)."""
    if (weights.parent / CONFIG_NAME).is_file():
        return read_config(weights.parent)
    from huggingface_hub import hf_hub_download

    repo_id, revision = split_hub_id(name)
    return json.loads(Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision)).read_text())


def load_model(source: str, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, list[str]]:
    """Load a trained classifier and its label names from a folder or the Hub, in eval mode.

    timm builds the architecture from ``config.json``; the weights are then read by us, from
    ``model.safetensors`` only, with a strict key check. (timm's own loader would follow a config's
    ``hf_hub_filename`` or fall back to a pickled ``pytorch_model.bin``.) Hub models are cached and work with
    ``HF_HUB_OFFLINE=1`` once downloaded.
    """
    name = resolve_model_source(source)
    if name.startswith("hf-hub:"):
        weights = ensure_hub_safetensors(name.removeprefix("hf-hub:"))
    else:
        weights = Path(name.removeprefix("local-dir:")) / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(
                f"{weights} not found; derm-accel loads only {WEIGHTS_NAME} (never pickled .bin/.pth files). "
                f"A model folder from `derm-accel train` holds {WEIGHTS_NAME} and config.json."
            )
    model = timm.create_model(name, pretrained=False)
    state = load_file(str(weights), device="cpu")
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(
            f"{weights}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); its predictions would be "
            f"NaN. Use a model whose training did not diverge."
        )
    model.load_state_dict(state, strict=True)
    model.default_tta = declared_tta(_config_beside(weights, name))  # its config.json's derm_accel.tta
    label_names = list(getattr(model, "pretrained_cfg", {}).get("label_names") or [])
    if not label_names:
        label_names = [str(i) for i in range(model.num_classes)]
    return model.to(device).eval(), label_names
