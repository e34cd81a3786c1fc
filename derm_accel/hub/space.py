"""A Hugging Face Space beside a pushed model: the ``derm-accel demo`` page, loading the model from the Hub by id.

The Space repo holds three files and the model folder's example images: ``README.md`` (Space metadata: sdk
gradio, the model under ``models:``, the license, plus the not-a-medical-device notice), ``app.py`` (builds the
demo for ``ORG/NAME``) and ``requirements.txt`` (derm-accel with its ``demo`` extra; Spaces install Gradio
itself from ``sdk_version``). Staging and uploading follow :mod:`derm_accel.hub.push`: everything is written into a
folder first, then sent in one commit; repeating a push is safe. The token is never printed or stored.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path

from derm_accel.core.errors import OutputExistsError
from derm_accel.core.fileio import staged_dir
from derm_accel.core.version import __version__
from derm_accel.hub.card import build_model_card
from derm_accel.hub.upload import PushError, check_repo_id, with_retries

logger = logging.getLogger(__name__)

SPACE_FILES = ("README.md", "app.py", "requirements.txt")
EXAMPLES_DIR = "examples"
MAX_EXAMPLES = 8
DEFAULT_REQUIREMENT = f"derm-accel[demo]=={__version__}"

APP = '''"""Gradio demo of the skin-lesion classifier {model_id}, written by `derm-accel push --space`.

Research use only: not a medical device. The model loads from the Hugging Face Hub by its id.
"""

from derm_accel.serving.demo import build_demo, launch

MODEL_ID = "{model_id}"

demo = build_demo(MODEL_ID, examples={examples})

if __name__ == "__main__":
    launch(demo)
'''


def check_space_id(space_id: str, repo_id: str) -> None:
    """A valid Space id other than the model's own (checked before anything is pushed)."""
    check_repo_id(space_id)
    if space_id == repo_id:
        raise ValueError(f"--space {space_id} is the model's own repo id; name the Space differently (ORG/NAME-demo).")


def space_card(repo_id: str, space_id: str, license: str, license_name: str | None = None) -> str:
    """The Space's README.md: metadata the Hub reads (sdk, app file, linked model, license) and a short text."""
    from huggingface_hub import SpaceCard, SpaceCardData

    try:
        sdk_version = importlib.metadata.version("gradio")  # the Gradio the demo was tested with here
    except importlib.metadata.PackageNotFoundError:  # the Hub then picks its current Gradio
        sdk_version = None
    data = SpaceCardData(
        title=f"{repo_id.split('/')[-1]} demo",
        sdk="gradio",
        sdk_version=sdk_version,
        app_file="app.py",
        license=license,
        license_name=license_name,
        models=[repo_id],
        tags=["dermatology", "medical-imaging", "image-classification", "derm-accel"],
        emoji="🔬",
        colorFrom="indigo",
        colorTo="gray",
        pinned=False,
        short_description="Skin-lesion classifier demo (research use only)",
    )
    text = (
        f"# {repo_id.split('/')[-1]} demo\n\n"
        f"Upload a dermoscopic photo of a skin lesion to see the top classes of [{repo_id}]"
        f"(https://huggingface.co/{repo_id}), a Grad-CAM heatmap of what drove the answer, and whether the image "
        "looks like the images the model was trained on.\n\n"
        "**Research use only. Not a medical device, not a diagnosis.** Anyone worried about a skin lesion should "
        "see a doctor.\n\n"
        f"Made with [derm-accel](https://huggingface.co/{repo_id}): `derm-accel demo --model {repo_id}` runs the "
        f"same page locally. This Space is `{space_id}`.\n"
    )
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))


def stage_space(
    model_dir: str | Path,
    out: str | Path,
    repo_id: str,
    space_id: str,
    *,
    revision: str | None = None,
    license: str | None = None,
    requirement: str | None = None,
) -> Path:
    """Write the Space's files for the model ``repo_id`` (pushed from ``model_dir``) into ``out``."""
    check_space_id(space_id, repo_id)
    model_dir = Path(model_dir)
    card = build_model_card(model_dir, repo_id, license=license)  # validates the folder and the license
    model_id = repo_id if not revision or revision == "main" else f"hf-hub:{repo_id}@{revision}"
    requirement = (requirement or DEFAULT_REQUIREMENT).strip()
    if not requirement or "\n" in requirement:
        raise ValueError(f"--space-requirement must be one pip requirement line, got {requirement!r}")
    examples = sorted(
        p for p in (model_dir / EXAMPLES_DIR).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
    )[:MAX_EXAMPLES]

    out = Path(out)
    if out.exists() and not all(p.name in (*SPACE_FILES, EXAMPLES_DIR) for p in out.iterdir()):
        raise OutputExistsError(f"{out} holds files that a Space push does not stage; choose a new folder.")
    with staged_dir(out) as tmp:  # swapped in whole once complete; an earlier staging is replaced
        (tmp / "README.md").write_text(
            space_card(repo_id, space_id, card.data.license, getattr(card.data, "license_name", None)),
            encoding="utf-8",
        )
        (tmp / "app.py").write_text(
            APP.format(model_id=model_id, examples=repr(EXAMPLES_DIR) if examples else None), encoding="utf-8"
        )
        (tmp / "requirements.txt").write_text(requirement + "\n", encoding="utf-8")
        if examples:
            (tmp / EXAMPLES_DIR).mkdir()
            for path in examples:
                shutil.copy2(path, tmp / EXAMPLES_DIR / path.name)
    return out


def push_space(
    model_dir: str | Path,
    repo_id: str,
    space_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    license: str | None = None,
    requirement: str | None = None,
    dry_run: bool = False,
    out: str | Path | None = None,
) -> str:
    """Create (or update) the Space ``space_id`` for the model ``repo_id``; return its URL, or with ``dry_run``
    the folder ``out`` it was staged into (nothing touches the network)."""
    check_space_id(space_id, repo_id)
    if dry_run:
        if out is None:
            raise ValueError("--dry-run needs a folder to stage the Space into.")
        return str(stage_space(model_dir, out, repo_id, space_id, revision=revision, license=license,
                               requirement=requirement))
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hf_constants

    if hf_constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set, so no Space can be pushed. Unset it, or use --dry-run --out DIR.")
    with tempfile.TemporaryDirectory(prefix="derm-accel-space-") as tmp:
        staged = stage_space(model_dir, Path(tmp) / "space", repo_id, space_id, revision=revision,
                             license=license, requirement=requirement)
        api = HfApi()  # the token is passed per call, never stored on an object that might be printed
        url = with_retries(
            lambda: api.create_repo(space_id, token=token, private=private, repo_type="space", space_sdk="gradio",
                                    exist_ok=True),
            "create the Space",
            space_id,
        )
        commit = with_retries(
            lambda: api.upload_folder(repo_id=space_id, repo_type="space", folder_path=staged, token=token,
                                      commit_message=f"Demo of {repo_id} with derm-accel {__version__}"),
            "upload the Space's files",
            space_id,
        )
    logger.info("pushed Space %s at commit %s", space_id, getattr(commit, "oid", None))
    return str(url).rstrip("/")
