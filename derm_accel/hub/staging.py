"""Staging a push: checking the model and report folders and copying exactly the files a repo holds.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from derm_accel.core.artifacts import ENSEMBLE_FILE, METRICS, RECIPE, TRAINING_INFO, VAL_METRICS
from derm_accel.core.errors import OutputExistsError
from derm_accel.guard.model import read_guard
from derm_accel.models.load import check_model_folder

MODEL_FILES = ("model.safetensors", "config.json")



RUN_FILES = (RECIPE, TRAINING_INFO, VAL_METRICS, "domain_guard.safetensors")



REPORT_SUFFIXES = (".json", ".csv", ".png", ".md")



EVAL_DIR = "eval"



def check_model_dir(model_dir: Path) -> None:
    """Refuse a model folder that would not load for others, naming the file: missing files, a damaged
    safetensors header, config and weights that disagree, non-finite weights, a damaged domain guard."""
    for name in MODEL_FILES:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir / name} not found; a model folder holds {' and '.join(MODEL_FILES)} "
                f"(RUN/best written by `derm-accel train`)."
            )
    _check_safetensors(model_dir / "model.safetensors")

    check_model_folder(model_dir)  # config and weights agree, weights finite: it loads for everyone

    read_guard(model_dir)  # a damaged guard file or settings fail here, naming the file, before any upload



def check_report_dir(report_dir: str | Path | None) -> None:
    if report_dir is not None and not (Path(report_dir) / METRICS).is_file():
        raise FileNotFoundError(
            f"{Path(report_dir) / 'metrics.json'} not found; pass the folder `derm-accel evaluate` wrote."
        )



def check_out_dir(out: str | Path) -> Path:
    """``out`` may be new, empty or an earlier staging (replaced whole); anything else is refused."""
    out = Path(out)
    if out.exists() and not _is_previous_staging(out):
        raise OutputExistsError(
            f"{out} holds files that a push does not stage; choose a new folder for the staged upload."
        )
    return out



def copy_model_files(model_dir: Path, dest: Path, link: bool) -> None:
    """The weights, timm config and run files a model repo (or an ensemble member's subfolder) holds."""
    for name in MODEL_FILES + RUN_FILES:
        if (model_dir / name).is_file():
            _link_or_copy(model_dir / name, dest / name, link)



def copy_report(report_dir: str | Path | None, dest: Path, link: bool) -> None:
    """The evaluation report's files into ``dest/eval``."""
    if report_dir is None:
        return
    (dest / EVAL_DIR).mkdir()
    for path in sorted(Path(report_dir).iterdir()):
        if path.is_file() and path.suffix in REPORT_SUFFIXES and not path.name.startswith("."):
            _link_or_copy(path, dest / EVAL_DIR / path.name, link)



def _is_previous_staging(folder: Path) -> bool:
    """An empty folder, or one holding only what a dry run stages, of a model or of an ensemble (so re-running
    it may replace it)."""

    if not folder.is_dir():
        return False
    allowed = {"README.md", EVAL_DIR, ENSEMBLE_FILE, *MODEL_FILES, *RUN_FILES}
    return all(entry.name in allowed or is_member_staging(entry) for entry in folder.iterdir())



def _check_safetensors(path: Path) -> None:
    """Read the header only: catches truncated or foreign files before anything is uploaded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-export the model.") from e
    if not keys:
        raise ValueError(f"{path} holds no tensors; re-export the model.")



def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    """Hard-link into a private staging folder (weights can be large); copy where the user may edit."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


MEMBER_DIR = re.compile(r"(fold|member)_\d+")


def is_member_staging(entry: Path) -> bool:
    """A member subfolder of an earlier ensemble staging: a member name holding only a model's files."""

    if not entry.is_dir() or entry.is_symlink() or not MEMBER_DIR.fullmatch(entry.name):
        return False
    return all(p.is_file() and p.name in (*MODEL_FILES, *RUN_FILES) for p in entry.iterdir())
