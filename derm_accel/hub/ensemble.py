"""Stage an ensemble folder (``ensemble.json`` beside its member model folders) as one Hub repo.

The repo holds ``ensemble.json`` at its root naming short member subfolders (``fold_k`` for the
``fold_k/best`` of a ``train --folds`` run, else ``member_1``, ``member_2``, ...), each member's model files
(weights, timm config, recipe, training info, validation metrics, domain guard) in its subfolder, the
evaluation report in ``eval/`` and a model card saying how to load it. Nothing else from the run folder
(checkpoints, fold data, logs) is staged. :func:`derm_accel.models.ensemble.load_models` loads the repo by its id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from derm_accel.core.fileio import staged_dir
from derm_accel.hub.ensemble_card import build_ensemble_card
from derm_accel.hub.staging import check_model_dir, check_out_dir, check_report_dir, copy_model_files, copy_report
from derm_accel.models.build import declared_color_constancy
from derm_accel.models.ensemble import check_members, read_ensemble, write_ensemble

FOLD = re.compile(r"fold_\d+")


def member_names(folder: Path, members: list[Path]) -> list[str]:
    """``fold_k`` for every member when each is ``fold_k/best`` (distinct k), else ``member_1``, ..."""
    root = folder.resolve()
    parts = [m.relative_to(root).parts for m in members]
    names = [p[0] for p in parts if len(p) == 2 and p[1] == "best" and FOLD.fullmatch(p[0])]
    if len(names) == len(members) and len(set(names)) == len(names):
        return names
    return [f"member_{i}" for i in range(1, len(members) + 1)]


def check_compatible(members: list[Path]) -> None:
    """Members must predict the same classes in the same order and preprocess images the same way; checked on
    ``config.json`` before anything is uploaded (:func:`derm_accel.models.ensemble.check_members`)."""
    configs = [(m / "config.json", json.loads((m / "config.json").read_text())) for m in members]
    check_members([(str(path), c.get("label_names"), preprocessing(c)) for path, c in configs])


def preprocessing(config: dict) -> dict:
    """A member's preprocessing as :func:`~derm_accel.models.build.data_config` gives it: its timm
    ``pretrained_cfg`` plus its declared colour constancy."""
    spec = declared_color_constancy(config)
    return {**(config.get("pretrained_cfg") or {}), **({"color_constancy": spec} if spec else {})}


def _note(folder: Path, members: list[Path]) -> str:
    """Where each member came from, relative to the pushed folder (never a local absolute path: the note of
    ``train --folds`` names the run folder, which stays private)."""
    root = folder.resolve()
    return "members from the pushed folder's " + ", ".join(m.relative_to(root).as_posix() for m in members)


def stage_ensemble(
    folder: Path,
    out: str | Path,
    repo_id: str,
    *,
    report_dir: str | Path | None = None,
    license: str | None = None,
    link: bool = False,
) -> Path:
    """Check every member as a single push would, then stage the ensemble repo into ``out`` (atomically)."""
    members = read_ensemble(folder)
    names = member_names(folder, members)
    for member in members:
        check_model_dir(member)
    check_compatible(members)
    check_report_dir(report_dir)
    named = list(zip(names, members, strict=True))
    card = build_ensemble_card(named, repo_id, report_dir=report_dir, license=license)

    out = check_out_dir(out)
    with staged_dir(out) as tmp:  # swapped in whole once complete
        for name, member in named:
            (tmp / name).mkdir()
            copy_model_files(member, tmp / name, link)
        write_ensemble(tmp, names, note=_note(folder, members))
        copy_report(report_dir, tmp, link)
        card.save(tmp / "README.md")
    return out

