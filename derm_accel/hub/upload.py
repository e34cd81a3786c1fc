"""Uploading a staged folder to the Hub in one commit, with retries of transient errors and messages that say
what to do. The token is never printed, logged, written to a file or put into an error message.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from derm_accel.core.errors import RunError
from derm_accel.core.version import __version__

logger = logging.getLogger(__name__)

T = TypeVar("T")



TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})



# Retries of a whole step; huggingface_hub also retries single requests (preupload, LFS) on its own.
RETRY_ATTEMPTS = 4



RETRY_BASE_DELAY_S = 2.0



class PushError(RunError):
    """The push failed; the message says why and what to do. Local files are never touched."""



def upload(
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


    if hf_constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set, so nothing can be pushed. Unset it, or use --dry-run --out DIR.")
    api = HfApi()  # the token is passed per call, never stored on an object that might be printed
    url = with_retries(
        lambda: api.create_repo(repo_id, token=token, private=private, exist_ok=True),
        "create the repo",
        repo_id,
    )
    if revision and revision != "main":
        with_retries(
            lambda: api.create_branch(repo_id, branch=revision, token=token, exist_ok=True),
            f"create branch {revision}",
            repo_id,
        )
    message = commit_message or f"Upload {repo_id.split('/')[-1]} with derm-accel {__version__}"
    commit = with_retries(
        lambda: api.upload_folder(
            repo_id=repo_id, folder_path=staged, revision=revision, commit_message=message, token=token
        ),
        "upload the files",
        repo_id,
    )
    logger.info("pushed %s at commit %s", repo_id, getattr(commit, "oid", None))
    url = str(url).rstrip("/")
    return f"{url}/tree/{revision}" if revision and revision != "main" else url



def with_retries(step: Callable[[], T], what: str, repo_id: str) -> T:
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



def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"'{repo_id}' is not a valid Hub repo id: {e}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"'{repo_id}' is not a Hub repo id of the form ORG/NAME.")

