"""Publish a trained model to the Hugging Face Hub so that ``timm.create_model("hf-hub:ORG/NAME")`` loads it.

The upload is staged first (weights, timm config, recipe, evaluation report, model card) into a folder, then
sent in one commit with ``upload_folder``. Every step is safe to repeat: the repo is created with
``exist_ok``, LFS objects are content-addressed, and files whose content is already on the Hub are skipped,
so re-running a push that was interrupted completes it, and re-pushing identical content makes no commit.

The token comes from ``token``, ``HF_TOKEN`` or the saved login (huggingface_hub resolves it). It is never
printed, logged, written to a file or put into an error message.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from derm_accel.core.artifacts import ENSEMBLE_FILE
from derm_accel.core.fileio import staged_dir
from derm_accel.hub.card import build_model_card
from derm_accel.hub.ensemble import stage_ensemble
from derm_accel.hub.staging import check_model_dir, check_out_dir, check_report_dir, copy_model_files, copy_report
from derm_accel.hub.upload import check_repo_id, upload

logger = logging.getLogger(__name__)




def stage_upload(
    model_dir: str | Path,
    out: str | Path,
    repo_id: str,
    *,
    report_dir: str | Path | None = None,
    license: str | None = None,
    link: bool = False,
) -> Path:
    """Copy exactly the files a push uploads into ``out`` and write the model card there. A folder holding
    ``ensemble.json`` is staged as one ensemble repo (:mod:`derm_accel.hub.ensemble`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a folder; pass RUN/best written by `derm-accel train`.")
    if (model_dir / ENSEMBLE_FILE).is_file():
        return stage_ensemble(model_dir, out, repo_id, report_dir=report_dir, license=license, link=link)
    check_model_dir(model_dir)
    check_report_dir(report_dir)
    # The card validates config.json and the license before anything is copied.
    card = build_model_card(model_dir, repo_id, report_dir=report_dir, license=license)

    out = check_out_dir(out)
    # Stage beside ``out`` and swap it in at the end: ``out`` is never left half-written.
    with staged_dir(out) as tmp:
        copy_model_files(model_dir, tmp, link)
        copy_report(report_dir, tmp, link)
        card.save(tmp / "README.md")
    return out


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    report_dir: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    out: str | Path | None = None,
    license: str | None = None,
) -> str:
    """Push a model folder (and its evaluation report) to ``repo_id``; return the repo URL.

    With ``dry_run`` nothing touches the network: the upload is staged into ``out``, which is returned.
    """
    check_repo_id(repo_id)
    if out is not None and not dry_run:
        raise ValueError("--out only applies with --dry-run; a real push stages into a temporary folder.")
    if dry_run:
        if out is None:
            raise ValueError("--dry-run needs --out DIR: the folder to stage the upload into.")
        staged = stage_upload(model_dir, out, repo_id, report_dir=report_dir, license=license)
        logger.info("staged %d files for %s in %s", sum(1 for p in staged.rglob("*") if p.is_file()), repo_id, staged)
        return str(staged)

    with tempfile.TemporaryDirectory(prefix="derm-accel-push-") as tmp:
        staged = stage_upload(
            model_dir, Path(tmp) / "upload", repo_id, report_dir=report_dir, license=license, link=True
        )
        return upload(staged, repo_id, private=private, revision=revision, commit_message=commit_message, token=token)


