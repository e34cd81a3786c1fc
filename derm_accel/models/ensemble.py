"""Ensembles: several classifiers answer together by averaging their class probabilities.

An ensemble is either several ``--model`` arguments or an *ensemble folder*: ``ensemble.json`` beside its
members, each a normal model folder (``config.json`` + ``model.safetensors``, optionally a domain guard).
``derm-accel train --folds K`` writes ``RUN/ensemble.json`` over ``RUN/fold_k/best``; ``derm-accel push RUN``
publishes the members as subfolders of one repo. :class:`Ensemble` is one ``torch.nn.Module`` whose output is
the log of the mean member probability, so softmax of it *is* the averaged probability and every consumer of a
classifier (evaluate, predict, serve, the demo) takes it unchanged.

Members must share their class names (same order) and their preprocessing (input size, crop, interpolation,
mean and std); anything else is refused with the member named. The domain guard of an ensemble is its first
member's guard.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from derm_accel.core.artifacts import ENSEMBLE_FILE, FOLD_DATA
from derm_accel.core.errors import InputError
from derm_accel.core.fileio import atomic_write_json
from derm_accel.core.paths import shareable_path
from derm_accel.models.build import data_config
from derm_accel.models.features import forward_with_features
from derm_accel.models.load import load_model, looks_like_path, split_hub_id
from derm_accel.models.tta import combine

FORMAT = 1
COMBINE = "mean_probability"
_HUB_NAMES: dict[str, str] = {}  # local snapshot folder of a Hub ensemble member -> "ORG/NAME/fold_k"
PREPROCESSING_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "color_constancy")


class EnsembleError(InputError):
    """An ensemble whose members cannot be combined, or an ensemble.json that does not describe one."""


class Ensemble(torch.nn.Module):
    """Members of one architecture family or several; ``forward`` gives log(mean softmax) over the members."""

    def __init__(self, members: list[torch.nn.Module], names: list[str], label_names: list[str]) -> None:
        super().__init__()
        if len(members) < 2:
            raise EnsembleError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = torch.nn.ModuleList(members)
        self.member_names = list(names)
        self.num_classes = len(label_names)
        self.pretrained_cfg = {**getattr(members[0], "pretrained_cfg", {}), "label_names": list(label_names)}
        self.default_cfg = self.pretrained_cfg
        declared = {getattr(m, "default_tta", None) for m in members}  # derm_accel.tta: only if all agree
        self.default_tta = declared.pop() if len(declared) == 1 else None
        # members share it (check_members); data_config(ensemble) then carries it like a single model's
        self.color_constancy = getattr(members[0], "color_constancy", None)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, members, classes]`` raw logits of every member."""
        return torch.stack([m(x) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine(self.member_logits(x))

    def forward_with_guard_features(self, x: torch.Tensor, max_dim: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ensemble logits, with the guard features of the first member (whose guard the ensemble uses)."""
        first, features = forward_with_features(self.members[0], x, max_dim)
        rest = [m(x) for m in self.members[1:]]
        return combine(torch.stack([first, *rest], dim=1)), features


def write_ensemble(folder: str | os.PathLike, members: list[str], *, note: str | None = None) -> Path:
    """Write ``folder/ensemble.json`` naming ``members`` (paths relative to ``folder``)."""
    folder = Path(folder)
    for member in members:
        _member_dir(folder, member)  # each must exist and be a model folder inside ``folder``
    spec = {"format": FORMAT, "combine": COMBINE, "members": list(members)}
    if note:
        spec["note"] = note
    path = folder / ENSEMBLE_FILE
    atomic_write_json(path, spec)
    return path


def read_ensemble(folder: str | os.PathLike) -> list[Path]:
    """The member folders an ``ensemble.json`` names, checked: inside ``folder``, each a model folder."""
    folder = Path(folder)
    path = folder / ENSEMBLE_FILE
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EnsembleError(f"{path} is not readable JSON ({exc}); rewrite it or pass each --model.") from exc
    members = spec.get("members") if isinstance(spec, dict) else None
    if spec.get("combine", COMBINE) != COMBINE or not isinstance(members, list) or len(members) < 2:
        raise EnsembleError(
            f"{path} must hold {{'combine': '{COMBINE}', 'members': [two or more member folders]}}; got {spec!r}"
        )
    return [_member_dir(folder, str(m)) for m in members]


def _member_dir(folder: Path, member: str) -> Path:
    path = (folder / member).resolve()
    if folder.resolve() not in path.parents:
        raise EnsembleError(f"{folder / ENSEMBLE_FILE}: member '{member}' lies outside {folder}; refused.")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise EnsembleError(
            f"{folder / ENSEMBLE_FILE}: member '{member}' ({path}) is not a model folder with config.json and "
            f"model.safetensors."
        )
    return path


def ensemble_members(source: str) -> list[str] | None:
    """The member sources of an ensemble folder (local or a Hub repo with ``ensemble.json``), else None."""
    local = Path(source.removeprefix("local-dir:")).expanduser()
    if local.is_dir():
        return [str(p) for p in read_ensemble(local)] if (local / ENSEMBLE_FILE).is_file() else None
    if source.startswith("local-dir:") or looks_like_path(source):
        return None
    repo = source.removeprefix("hf-hub:")
    if repo.count("/") != 1:
        return None
    members = _hub_members(repo)  # probed once per process and repo, like the model cache in predict
    return None if members is None else list(members)


@functools.lru_cache(maxsize=32)
def _hub_members(repo: str) -> tuple[str, ...] | None:
    """Download an ensemble repo's members (safetensors and JSON only); None when the repo has no ensemble.json."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = split_hub_id(repo)
    try:
        hf_hub_download(repo_id, ENSEMBLE_FILE, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None  # a single model (or, offline, one whose ensemble.json was never downloaded)
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) in (401, 403, 404):
            return None  # missing or not ours to read: loading the model itself then says why, naming the repo
        raise
    root = snapshot_download(
        repo_id, revision=revision, allow_patterns=[ENSEMBLE_FILE, "*/*.json", "*/*.safetensors"]
    )
    members = tuple(str(p) for p in read_ensemble(root))
    for path in members:  # reports name a Hub member by its repo, never by the local cache's snapshot hash
        _HUB_NAMES[path] = f"{repo}/{Path(path).relative_to(Path(root).resolve()).as_posix()}"
    return members


def expand_sources(sources: str | list[str]) -> list[str]:
    """Model arguments with every ensemble folder or repo replaced by its members."""
    expanded: list[str] = []
    for source in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        expanded += ensemble_members(os.fspath(source)) or [os.fspath(source)]
    return expanded


def load_models(sources: str | list[str], *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, list[str]]:
    """One model (:func:`derm_accel.models.load.load_model`), or an :class:`Ensemble` of several or of an ensemble
    folder's members."""
    expanded = expand_sources(sources)
    if len(expanded) == 1:
        return load_model(expanded[0], device=device)
    return load_ensemble(expanded, device=device)


def check_not_trained_on(source: Any, data: str | os.PathLike, split: str) -> None:
    """Refuse to score a ``train --folds`` ensemble on a split of the dataset its folds were cut from: every
    image there (but a ``--holdout`` split) was in the training data of all but one member."""
    if not isinstance(source, (str, os.PathLike)):
        return
    folder = Path(os.fspath(source).removeprefix("local-dir:"))
    manifest = folder / FOLD_DATA / "folds.json"
    if not (folder / ENSEMBLE_FILE).is_file() or not manifest.is_file():
        return
    folds = json.loads(manifest.read_text())
    if not folds.get("data") or Path(folds["data"]).resolve() != Path(data).resolve() or folds.get("holdout") == split:
        return
    holdout = folds.get("holdout")
    raise EnsembleError(
        f"{folder} is the ensemble of {folds['folds']} fold models cut from {data}: its '{split}' split was in "
        f"their training data, so its scores would be optimistic. "
        + (f"Evaluate --split {holdout} (held out of every fold), " if holdout else "")
        + f"evaluate on another dataset, or read each image's out-of-fold score in {folder / 'oof_predictions.csv'}."
    )


def load_ensemble(sources: list[str], *, device: str | torch.device = "cpu") -> tuple[Ensemble, list[str]]:
    """Load every member and check that they can be averaged: same classes, same preprocessing."""
    loaded = [_load_member(source, device) for source in sources]
    check_members([(s, names, data_config(net)) for s, (net, names) in zip(sources, loaded, strict=True)])
    labels = loaded[0][1]
    ensemble = Ensemble([net for net, _ in loaded], [display_name(s) for s in sources], labels)
    return ensemble.to(device).eval(), list(labels)


def _load_member(source: str, device: str | torch.device) -> tuple[torch.nn.Module, list[str]]:
    try:
        return load_model(source, device=device)
    except (InputError, FileNotFoundError) as e:  # say which member, whichever way the members were named
        raise EnsembleError(f"ensemble member {display_name(source)}: {e}") from e


def check_members(members: list[tuple[str, Any, dict[str, Any]]]) -> None:
    """``(name, label names, preprocessing config)`` per member: an ensemble feeds every member the same tensor
    and averages class by class, so all must share classes (in order), input size, crop, colour constancy and
    normalisation."""
    first, labels, cfg = members[0]
    for name, names, other in members[1:]:
        if names != labels:
            raise EnsembleError(
                f"{name} predicts {names}, but {first} predicts {labels}: members of an ensemble must have the "
                f"same classes in the same order."
            )
        diff = {k: (cfg.get(k), other.get(k)) for k in PREPROCESSING_KEYS if _plain(cfg.get(k)) != _plain(other.get(k))}
        if diff:
            raise EnsembleError(
                f"{name} preprocesses images differently from {first} ({diff}); an ensemble feeds every member the "
                f"same tensor, so its members must share input size, crop, colour constancy and normalisation."
            )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def display_name(source: str) -> str:
    """A member's name in reports and cards: never the user's absolute directory layout."""
    local = source.removeprefix("local-dir:")
    if local in _HUB_NAMES:
        return _HUB_NAMES[local]
    return shareable_path(local) if Path(local).exists() else source


class MemberLogits(torch.nn.Module):
    """An ensemble's members side by side: ``[batch, members * classes]``. One inference pass then yields the
    ensemble (:func:`combine_members`) and every member's own scores (:func:`member_metrics`)."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(x).flatten(1)

    def forward_with_guard_features(self, x: torch.Tensor, max_dim: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every member's logits side by side, with the guard features of the first member (the ensemble's guard)."""
        first, features = forward_with_features(self.ensemble.members[0], x, max_dim)
        rest = [m(x) for m in self.ensemble.members[1:]]
        return torch.stack([first, *rest], dim=1).flatten(1), features


def split_members(logits: torch.Tensor, members: int) -> torch.Tensor:
    """``[N, views, members * classes]`` from :class:`MemberLogits` -> ``[N, views, members, classes]``."""
    n, v, width = logits.shape
    return logits.reshape(n, v, members, width // members)


def combine_members(member_logits: torch.Tensor) -> torch.Tensor:
    """``[N, views, members, classes]`` -> the ensemble's ``[N, views, classes]`` (log mean probability)."""
    n, v, m, c = member_logits.shape
    return combine(member_logits.reshape(n * v, m, c)).reshape(n, v, c)
