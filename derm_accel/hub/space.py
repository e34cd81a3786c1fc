"""A Hugging Face Space beside a pushed model: the ``derm-accel demo`` page, loading the model from the Hub by id.

The Space repo holds ``README.md`` (Space metadata: sdk gradio, the model under ``models:``, the license, plus
the not-a-medical-device notice), ``app.py`` (builds the demo for ``ORG/NAME``), the model folder's example
images, a wheel of the derm-accel that pushed it, and ``requirements.txt``: that wheel with its ``demo`` extra,
and every direct dependency pinned at the version installed here (what was tested). derm-accel is on no package
index, so the Space installs it from its own repo: a Space build mounts only requirements.txt (the other files
are copied in after the install), so the wheel is named by its URL in the Space repo, with its sha256, rather
than by a relative path. Spaces install Gradio itself from ``sdk_version``, the same Gradio as the pin.
``--space-requirement LINE`` replaces requirements.txt with that one line (and stages no wheel).

Staging and uploading follow :mod:`derm_accel.hub.push`: everything is written into a folder first, then sent in one
commit; repeating a push is safe. The token is never printed or stored.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from derm_accel.core.errors import InputError, OutputExistsError
from derm_accel.core.fileio import staged_dir
from derm_accel.core.version import __version__
from derm_accel.hub.card import build_model_card
from derm_accel.hub.upload import PushError, check_repo_id, with_retries

logger = logging.getLogger(__name__)

SPACE_FILES = ("README.md", "app.py", "requirements.txt")
EXAMPLES_DIR = "examples"
MAX_EXAMPLES = 8
DISTRIBUTION = "derm-accel"
EXTRA = "demo"
PACKAGE = Path(__file__).resolve().parents[1]  # the derm_accel folder this module runs from
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same code gives the same wheel, byte for byte

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


def build_wheel(out_dir: str | Path) -> Path:
    """A wheel of the derm-accel running now (pure Python: ``py3-none-any``) in ``out_dir``: the imported
    package's files (an editable checkout or an installed copy alike) with the installed distribution's
    metadata and entry points. Deterministic, so its sha256 changes only with the code or the metadata."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            "derm-accel is not installed (no package metadata), so no wheel of it can go into the Space: "
            "`pip install -e .` in the checkout, or pass --space-requirement LINE."
        ) from None
    version = dist.version
    package = PACKAGE
    stem = f"derm_accel-{version}"
    info = f"{stem}.dist-info"
    entries: list[tuple[str, bytes]] = [
        (f"derm_accel/{p.relative_to(package).as_posix()}", p.read_bytes())
        for p in sorted(package.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and not p.name.startswith(".")
    ]
    # An editable checkout may be found through its derm_accel.egg-info (PKG-INFO: the same format, older name).
    metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    if not metadata:
        raise InputError("derm-accel's installed metadata is unreadable; reinstall it (pip install -e .).")
    entries.append((f"{info}/METADATA", metadata.encode()))
    if dist.read_text("entry_points.txt"):
        entries.append((f"{info}/entry_points.txt", dist.read_text("entry_points.txt").encode()))
    wheel_meta = "Wheel-Version: 1.0\nGenerator: derm-accel push --space\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries.append((f"{info}/WHEEL", wheel_meta.encode()))
    record = [f"{name},sha256={_b64_sha256(data)},{len(data)}" for name, data in entries]
    entries.append((f"{info}/RECORD", ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()))

    path = Path(out_dir) / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries:
            member = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            member.external_attr = 0o644 << 16
            member.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(member, data)
    return path


def _b64_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def tested_requirements() -> list[str]:
    """derm-accel[demo]'s direct dependencies pinned at the versions installed here (a local label such as
    ``+cu130`` dropped: the index serves the plain release). One not installed stays as derm-accel declares it."""
    lines: dict[str, str] = {}
    for text in importlib.metadata.requires(DISTRIBUTION) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": EXTRA}):
            continue
        name = canonicalize_name(req.name)
        if name == DISTRIBUTION:  # derm-accel[x] inside an extra
            continue
        try:
            installed = Version(importlib.metadata.version(req.name)).public
        except importlib.metadata.PackageNotFoundError:
            logger.warning("%s is not installed here, so the Space's requirements.txt cannot pin it", req.name)
            lines.setdefault(name, f"{req.name}{req.specifier}")
            continue
        lines[name] = f"{name}=={installed}"
    return sorted(lines.values())


def space_requirements(space_id: str, wheel: Path) -> str:
    """requirements.txt of a Space holding ``wheel``: the wheel by its URL in the Space repo (with its sha256,
    which pip checks) with the demo extra, then the tested pins."""
    from huggingface_hub import constants as hf_constants

    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    url = f"{hf_constants.ENDPOINT.rstrip('/')}/spaces/{space_id}/resolve/main/{wheel.name}#sha256={sha256}"
    return (
        f"# Written by `derm-accel push --space` with derm-accel {__version__}: derm-accel from its wheel in this\n"
        "# Space (a Space build sees only this file while it installs), and every direct dependency at the\n"
        "# version the demo was tested with.\n"
        f"{DISTRIBUTION}[{EXTRA}] @ {url}\n" + "".join(f"{line}\n" for line in tested_requirements())
    )


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
    if requirement is not None and (not requirement.strip() or "\n" in requirement.strip()):
        raise ValueError(f"--space-requirement must be one pip requirement line, got {requirement!r}")
    examples = sorted(
        p for p in (model_dir / EXAMPLES_DIR).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
    )[:MAX_EXAMPLES]

    out = Path(out)
    if out.exists() and not all(p.name in (*SPACE_FILES, EXAMPLES_DIR) or p.suffix == ".whl" for p in out.iterdir()):
        raise OutputExistsError(f"{out} holds files that a Space push does not stage; choose a new folder.")
    with staged_dir(out) as tmp:  # swapped in whole once complete; an earlier staging is replaced
        (tmp / "README.md").write_text(
            space_card(repo_id, space_id, card.data.license, getattr(card.data, "license_name", None)),
            encoding="utf-8",
        )
        (tmp / "app.py").write_text(
            APP.format(model_id=model_id, examples=repr(EXAMPLES_DIR) if examples else None), encoding="utf-8"
        )
        if requirement is not None:
            (tmp / "requirements.txt").write_text(requirement.strip() + "\n", encoding="utf-8")
        else:
            (tmp / "requirements.txt").write_text(space_requirements(space_id, build_wheel(tmp)), encoding="utf-8")
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

    if private and requirement is None:
        logger.warning(
            "a private Space's build downloads derm-accel's wheel from the Space itself without a token, which a "
            "private repo refuses: make the Space public, or pass --space-requirement LINE"
        )
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
