"""push --space: a Gradio Space whose app.py loads the model by its Hub id, staged (--dry-run) and pushed to the
in-repo Hub server, then built as a Space build does it (a fresh venv, `pip install -r requirements.txt` with
only that file at hand) and run against that server: its page answers like predict on the local model folder."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from packaging.version import Version
from typer.testing import CliRunner

from tests.hub_fixtures import hub_env, run_python, write_model_dir
from tests.hub_server import LocalHubServer

TOKEN = "hf_derm" + "SpaceSecret" + "5c2e8a0f1b3d"  # never a real token
REPO_ID = "derm-lab/tiny-derm"
SPACE_ID = "derm-lab/tiny-derm-demo"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_model_dir(tmp_path_factory.mktemp("run"))
    from derm_accel.data.synthetic import render

    (folder / "examples").mkdir()
    render(0, 1, 96).save(folder / "examples" / "lesion.jpg")
    return folder


def _cli(*args: str) -> Result:
    from derm_accel.cli import app

    return CliRunner().invoke(app, list(args))


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_dry_run_stages_a_space_that_loads_the_model_by_id(model_dir: Path, tmp_path: Path) -> None:
    proc = _cli("push", str(model_dir), "--repo-id", REPO_ID, "--space", SPACE_ID, "--dry-run",
                "--out", str(tmp_path / "staged"))
    assert proc.exit_code == 0, proc.output
    space = tmp_path / "staged-space"
    assert f"staged Space: {space}" in proc.stdout
    assert sorted(p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()) == [
        "README.md", "app.py", f"derm_accel-{importlib.metadata.version('derm-accel')}-py3-none-any.whl",
        "examples/lesion.jpg", "requirements.txt",
    ]
    meta = _front_matter((space / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["models"] == [REPO_ID] and meta["license"] == "cc-by-nc-4.0"
    assert "Not a medical device" in (space / "README.md").read_text()
    app = (space / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert f'MODEL_ID = "{REPO_ID}"' in app and "build_demo(MODEL_ID, examples='examples')" in app
    wheels = sorted(space.glob("*.whl"))
    assert [w.name for w in wheels] == [f"derm_accel-{importlib.metadata.version('derm-accel')}-py3-none-any.whl"]
    lines = [line for line in (space / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    url = f"https://huggingface.co/spaces/{SPACE_ID}/resolve/main/{wheels[0].name}"
    assert lines[0] == f"derm-accel[demo] @ {url}#sha256={hashlib.sha256(wheels[0].read_bytes()).hexdigest()}"
    pins = dict(line.split("==") for line in lines[1:])
    for name in ("torch", "torchvision", "timm", "accelerate", "huggingface-hub", "gradio", "fastapi"):
        assert Version(pins[name]) == Version(Version(importlib.metadata.version(name)).public), name
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
    shipped = {"derm_accel/py.typed", "derm_accel/serving/demo.py", "derm_accel/evaluation/derm_metrics/README.md"}
    assert shipped <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(p.name == "app.py" for p in (tmp_path / "staged").rglob("*"))  # the model upload stays clean


def test_bad_space_ids_are_refused_before_anything_is_staged(model_dir: Path, tmp_path: Path) -> None:
    same = _cli("push", str(model_dir), "--repo-id", REPO_ID, "--space", REPO_ID, "--dry-run", "--out",
                str(tmp_path / "a"))
    assert same.exit_code == 2 and "model's own repo id" in same.output and not (tmp_path / "a").exists()
    bad = _cli("push", str(model_dir), "--repo-id", REPO_ID, "--space", "not a repo", "--dry-run", "--out",
               str(tmp_path / "b"))
    assert bad.exit_code == 2 and "not a valid Hub repo id" in bad.output and not (tmp_path / "b").exists()


def _fresh_venv(folder: Path) -> Path:
    """A new venv whose interpreter also sees this environment's installed distributions (through a .pth file):
    a real install and resolver run for derm-accel's wheel and the pins, without downloading torch and Gradio
    again. pip itself runs from this environment (`pip --python`)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "tested_environment.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    return python


def _pip(python: Path, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_pushed_space_installs_in_a_fresh_venv_and_answers_like_predict(model_dir: Path, tmp_path: Path) -> None:
    image = model_dir / "examples" / "lesion.jpg"
    mount, app_dir = tmp_path / "mount", tmp_path / "app"  # a Space build sees requirements.txt alone
    mount.mkdir()
    app_dir.mkdir()
    with LocalHubServer(token=TOKEN) as hub:
        env = hub_env(hub.url, tmp_path / "hf_home", HF_TOKEN=TOKEN, GRADIO_ANALYTICS_ENABLED="False")
        # A fresh interpreter (HF_ENDPOINT set before huggingface_hub's import) with an empty Hub cache: push
        # with the CLI, then fetch the Space's requirements.txt and app.py as its build does.
        code = f"""
import shutil
from derm_accel.cli import app
app(["push", {str(model_dir)!r}, "--repo-id", {REPO_ID!r}, "--space", {SPACE_ID!r}], standalone_mode=False)
from huggingface_hub import hf_hub_download
shutil.copy(hf_hub_download({SPACE_ID!r}, "requirements.txt", repo_type="space"), {str(mount)!r})
shutil.copy(hf_hub_download({SPACE_ID!r}, "app.py", repo_type="space"), {str(app_dir)!r})
"""
        ran = run_python(code, env, timeout=300)
        assert f"pushed Space: {hub.url}/spaces/{SPACE_ID}" in ran.stdout
        assert TOKEN not in ran.stdout + ran.stderr
        space = hub.state.repos[f"spaces/{SPACE_ID}"]
        assert space.repo_type == "space" and space.sdk == "gradio"
        files = set(hub.state.files(SPACE_ID, repo_type="space"))
        assert files >= {"README.md", "app.py", "requirements.txt", "examples/lesion.jpg"}
        assert any(f.startswith("derm_accel-") and f.endswith(".whl") for f in files)
        assert "model.safetensors" in hub.state.files(REPO_ID)

        # The build: a fresh venv, `pip install -r requirements.txt` from the mount, no package index (the wheel
        # comes from the Space repo; every pin must already be met, else pip would need the index and fail).
        bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # the venv imports the installed wheel only
        python = _fresh_venv(tmp_path / "venv")
        installed = _pip(python, "install", "--no-index", "-r", "requirements.txt", cwd=mount, env=bare)
        assert "Successfully installed derm-accel" in installed.stdout
        _pip(python, "check", cwd=mount, env=bare)

        run_app = f"""
import json, runpy
import derm_accel
space = runpy.run_path("app.py", run_name="space_app")
handler = next(iter(space["demo"].fns.values())).fn
scores, verdict, heat, raw = handler({str(image)!r})
print("FILE=" + derm_accel.__file__)
print("RAW=" + json.dumps(raw))
"""
        proc = subprocess.run([str(python), "-c", run_app], cwd=app_dir, env=bare, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("FILE=")[1].splitlines()[0].startswith(str(tmp_path / "venv"))
    raw = json.loads(proc.stdout.split("RAW=")[1])
    from derm_accel.inference.predict import predict

    expected = predict(str(image), model=str(model_dir))[0]
    expected.pop("path")
    assert raw["label"] == expected["label"]
    assert raw["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert [t["label"] for t in raw["top_k"]] == [t["label"] for t in expected["top_k"]]


def test_a_folder_with_other_files_is_not_replaced(model_dir: Path, tmp_path: Path) -> None:
    from derm_accel.hub.space import stage_space

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="choose a new folder"):
        stage_space(model_dir, taken, REPO_ID, SPACE_ID)
    assert (taken / "notes.txt").read_text() == "mine"
    staged = stage_space(model_dir, tmp_path / "again", REPO_ID, SPACE_ID, revision="v2",
                         requirement="derm-accel[demo] @ git+https://example.org/derm-accel@v0.1.0")
    assert 'MODEL_ID = "hf-hub:derm-lab/tiny-derm@v2"' in (staged / "app.py").read_text()
    assert (staged / "requirements.txt").read_text() == "derm-accel[demo] @ git+https://example.org/derm-accel@v0.1.0\n"
    no_examples = shutil.copytree(model_dir, tmp_path / "model", ignore=shutil.ignore_patterns("examples"))
    bare = stage_space(no_examples, tmp_path / "bare", REPO_ID, SPACE_ID)
    assert "examples=None" in (bare / "app.py").read_text() and not (bare / "examples").exists()
