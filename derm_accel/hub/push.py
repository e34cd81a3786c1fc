"""Publish a trained model to the Hugging Face Hub so that ``timm.create_model("hf-hub:ORG/NAME")`` loads it.

The upload is staged first (weights, timm config, recipe, evaluation report, model card) into a folder, then
sent in one commit with ``upload_folder``. Every step is safe to repeat: the repo is created with
``exist_ok``, LFS objects are content-addressed, and files whose content is already on the Hub are skipped,
so re-running a push that was interrupted completes it, and re-pushing identical content makes no commit.

The token comes from ``token``, ``HF_TOKEN`` or the saved login (huggingface_hub resolves it). It is never
printed, logged, written to a file or put into an error message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from derm_accel.artifacts import METRICS, RECIPE, TRAINING_INFO, VAL_METRICS
from derm_accel.errors import OutputExistsError, RunError
from derm_accel.fileio import staged_dir
from derm_accel.model_card import build_model_card

logger = logging.getLogger(__name__)

T = TypeVar("T")

MODEL_FILES = ("model.safetensors", "config.json")
RUN_FILES = (RECIPE, TRAINING_INFO, VAL_METRICS, "domain_guard.safetensors")
REPORT_SUFFIXES = (".json", ".csv", ".png", ".md")
EVAL_DIR = "eval"
ENSEMBLE_FILE = "ensemble.json"  # derm_accel.ensemble.ENSEMBLE_FILE; that module imports torch
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Retries of a whole step; huggingface_hub also retries single requests (preupload, LFS) on its own.
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 2.0


class PushError(RunError):
    """The push failed; the message says why and what to do. Local files are never touched."""


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
    ``ensemble.json`` is staged as one ensemble repo (:mod:`derm_accel.hub_ensemble`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a folder; pass RUN/best written by `derm-accel train`.")
    if (model_dir / ENSEMBLE_FILE).is_file():
        from derm_accel.hub_ensemble import stage_ensemble

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
    from derm_accel.models import check_model_folder  # torch and timm only when a push is staged

    check_model_folder(model_dir)  # config and weights agree, weights finite: it loads for everyone
    from derm_accel.guard.model import read_guard

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
    from derm_accel.hub_ensemble import is_member_staging

    if not folder.is_dir():
        return False
    allowed = {"README.md", EVAL_DIR, ENSEMBLE_FILE, *MODEL_FILES, *RUN_FILES}
    return all(entry.name in allowed or is_member_staging(entry) for entry in folder.iterdir())


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
    _check_repo_id(repo_id)
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
        return _upload(staged, repo_id, private=private, revision=revision, commit_message=commit_message, token=token)


def _upload(
    staged: Path,
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    token: str | None,
) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hf_constants

    from derm_accel import __version__

    if hf_constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set, so nothing can be pushed. Unset it, or use --dry-run --out DIR.")
    api = HfApi()  # the token is passed per call, never stored on an object that might be printed
    url = _with_retries(
        lambda: api.create_repo(repo_id, token=token, private=private, exist_ok=True),
        "create the repo",
        repo_id,
    )
    if revision and revision != "main":
        _with_retries(
            lambda: api.create_branch(repo_id, branch=revision, token=token, exist_ok=True),
            f"create branch {revision}",
            repo_id,
        )
    message = commit_message or f"Upload {repo_id.split('/')[-1]} with derm-accel {__version__}"
    commit = _with_retries(
        lambda: api.upload_folder(
            repo_id=repo_id, folder_path=staged, revision=revision, commit_message=message, token=token
        ),
        "upload the files",
        repo_id,
    )
    logger.info("pushed %s at commit %s", repo_id, getattr(commit, "oid", None))
    url = str(url).rstrip("/")
    return f"{url}/tree/{revision}" if revision and revision != "main" else url


def _with_retries(step: Callable[[], T], what: str, repo_id: str) -> T:
    """Run ``step``, retrying transient network and server errors with exponential backoff."""
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return step()
        except Exception as exc:
            status = _http_status(exc)
            if status in (401, 403):
                raise PushError(
                    f"The Hub refused to let us {what} for {repo_id} (HTTP {status}). Use a token with write "
                    f"access to that namespace: pass --token, set HF_TOKEN, or run `hf auth login`. "
                    f"Nothing local was changed."
                ) from exc
            if not _is_transient(exc):
                if status is not None:
                    raise PushError(
                        f"Could not {what} for {repo_id}: the Hub answered HTTP {status} "
                        f"({_server_message(exc)}). "
                        f"Nothing local was changed; fix the cause and run the same push again."
                    ) from exc
                raise
            if attempt == RETRY_ATTEMPTS:
                raise PushError(
                    f"Could not {what} for {repo_id} after {RETRY_ATTEMPTS} attempts ({_describe(exc)}). "
                    "Check the network connection (and HF_ENDPOINT if set), then run the same push again: "
                    "it resumes; files already on the Hub are not uploaded twice. Nothing local was changed."
                ) from exc
            delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
            logger.warning("could not %s (%s); retrying in %.0f s", what, _describe(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _http_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's network errors (huggingface_hub 2.x uses httpx2, 1.x httpx), plus the stdlib's."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(__import__(module).TransportError)
    return tuple(errors)


def _causes(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _http_status(exc: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _causes(exc):
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            return int(e.response.status_code)
    return None


def _is_transient(exc: BaseException) -> bool:
    network = _http_errors()
    status = _http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    return any(isinstance(e, network) for e in _causes(exc))


def _server_message(exc: BaseException) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _causes(exc):
        if isinstance(e, HfHubHTTPError):
            return getattr(e, "server_message", None) or type(e).__name__
    return type(exc).__name__


def _describe(exc: BaseException) -> str:
    status = _http_status(exc)
    if status is not None:
        return f"HTTP {status}"
    network = _http_errors()
    for e in _causes(exc):
        if isinstance(e, network):
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return type(exc).__name__


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"'{repo_id}' is not a valid Hub repo id: {e}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"'{repo_id}' is not a Hub repo id of the form ORG/NAME.")


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
