"""Model creation, ImageNet weights and export in timm's Hub layout.

Every model derm-accel writes is a plain timm checkpoint folder (``model.safetensors`` + ``config.json``), so
``timm.create_model("local-dir:DIR", pretrained=True)`` or ``"hf-hub:ORG/NAME"`` loads it without derm-accel.
Weights are only ever read with safetensors: nothing downloaded is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file

from derm_accel.core.artifacts import CONFIG_NAME, WEIGHTS_NAME
from derm_accel.core.errors import InputError
from derm_accel.models.build import data_config, declared_color_constancy
from derm_accel.models.tta import declared_tta


class WeightsMismatchError(InputError):
    """A model folder whose model.safetensors does not fit the architecture its config.json names."""


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
        model: Any = timm.create_model(f"local-dir:{model_dir.resolve()}", pretrained=False)  # timm attributes
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
    model: Any = timm.create_model(name, pretrained=False)  # gains timm's and derm-accel's attributes
    state = load_file(str(weights), device="cpu")
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(
            f"{weights}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); its predictions would be "
            f"NaN. Use a model whose training did not diverge."
        )
    config = _config_beside(weights, name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        architecture = config.get("architecture") if isinstance(config, dict) else None
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).splitlines()[0])
        first = first if len(first) <= 200 else first[:200] + " ..."
        raise WeightsMismatchError(
            f"{weights} does not fit the architecture {architecture or name} that its config.json names "
            f"({first}): the two files come from different models. Put back the config.json that was written "
            "with these weights (or the weights written with this config)."
        ) from e
    model.default_tta = declared_tta(config)  # its config.json's derm_accel.tta
    model.color_constancy = declared_color_constancy(config)  # and derm_accel.color_constancy
    label_names = list(getattr(model, "pretrained_cfg", {}).get("label_names") or [])
    if not label_names:
        label_names = [str(i) for i in range(model.num_classes)]
    return model.to(device).eval(), label_names
