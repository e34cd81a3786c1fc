"""predict(): label, probability, top-k from local and Hub models; per-file errors; folders; cache; CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_fixtures import LABELS, hub_env, run_python, write_model_dir
from tests.hub_server import LocalHubServer

TOKEN = "hf_predict" + "TestSecret" + "0c4b"
REPO_ID = "derm-lab/tiny-derm"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/ with good JPEG/PNG files (one in a sub-folder), a text file, and broken images."""
    from derm_accel.data.synthetic import render

    root = tmp_path_factory.mktemp("photos")
    render(0, seed=1, size=64).save(root / "a.jpg")
    render(1, seed=2, size=64).save(root / "b.png")
    (root / "clinic" / "day2").mkdir(parents=True)
    render(2, seed=3, size=64).convert("L").save(root / "clinic" / "day2" / "c.JPG")
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    bad = root.parent / f"{root.name}-bad"
    bad.mkdir()
    (bad / "fake.jpg").write_text("this is text with a .jpg name")
    jpeg = (root / "a.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    return root


def _reference(model_dir: Path, paths: list[Path]):
    """Probabilities computed the plain timm way, to check predict's numbers and label mapping."""
    import timm
    import torch
    from PIL import Image

    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model(x).softmax(-1)


def test_predict_gives_label_probability_and_top_k(model_dir: Path, images: Path) -> None:
    from derm_accel import predict

    paths = [images / "a.jpg", images / "b.png"]
    results = predict([str(p) for p in paths], model=str(model_dir), top_k=2, device="cpu")
    probs = _reference(model_dir, paths)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    for r, p in zip(results, probs, strict=True):
        assert set(r) == {"path", "label", "probability", "top_k", "ood_score", "in_domain", "abstain", "reason"}
        assert (r["ood_score"], r["in_domain"], r["abstain"]) == (None, None, False)  # this model has no guard
        assert "no domain guard" in r["reason"]
        assert len(r["top_k"]) == 2
        assert r["label"] == LABELS[int(p.argmax())]
        assert r["probability"] == pytest.approx(float(p.max()), abs=1e-6)
        assert r["top_k"][0] == {"label": r["label"], "probability": r["probability"]}
        second = int(p.argsort(descending=True)[1])
        assert r["top_k"][1]["label"] == LABELS[second]
        assert r["top_k"][1]["probability"] == pytest.approx(float(p[second]), abs=1e-6)
    # A single path, and top_k larger than the number of classes.
    one = predict(images / "a.jpg", model=str(model_dir), top_k=10)
    assert len(one) == 1 and len(one[0]["top_k"]) == len(LABELS)
    assert sum(t["probability"] for t in one[0]["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_bad_files_get_per_file_errors_and_the_rest_is_predicted(model_dir: Path, images: Path) -> None:
    from derm_accel import predict

    bad = images.parent / f"{images.name}-bad"
    inputs = [
        images / "a.jpg",
        bad / "fake.jpg",
        bad / "truncated.jpg",
        images / "missing.jpg",
        images / "b.png",
    ]
    results = predict(inputs, model=str(model_dir), batch_size=2)
    assert [r["path"] for r in results] == [str(p) for p in inputs]
    assert "label" in results[0] and "label" in results[4]
    assert "not an image" in results[1]["error"]
    assert "truncated" in results[2]["error"] or "corrupt" in results[2]["error"]
    assert results[3]["error"] == "file not found"
    assert all(set(r) == {"path", "error"} for r in results[1:4])
    # The good files get the same answer as when predicted on their own.
    alone = predict(images / "b.png", model=str(model_dir))[0]
    assert results[4]["probability"] == pytest.approx(alone["probability"], abs=1e-6)


def test_folders_are_searched_recursively_for_images(model_dir: Path, images: Path, tmp_path: Path) -> None:
    from derm_accel import predict

    results = predict(images, model=str(model_dir))
    expected = sorted([images / "a.jpg", images / "b.png", images / "clinic" / "day2" / "c.JPG"])
    assert [r["path"] for r in results] == [str(p) for p in expected]
    assert all(r["label"] in LABELS for r in results)  # the grayscale JPEG was converted to RGB
    (tmp_path / "empty").mkdir()
    (empty,) = predict(tmp_path / "empty", model=str(model_dir))
    assert "no image files" in empty["error"]


def test_loaded_models_are_cached_per_source(model_dir: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import derm_accel.models.ensemble
    from derm_accel import predict
    from derm_accel.inference.predict import clear_model_cache

    clear_model_cache()
    calls = []
    real = derm_accel.models.ensemble.load_model

    def counting(source, **kwargs):
        calls.append(source)
        return real(source, **kwargs)

    monkeypatch.setattr(derm_accel.models.ensemble, "load_model", counting)
    first = predict(images / "a.jpg", model=str(model_dir), device="cpu")
    second = predict(images / "a.jpg", model=str(model_dir), device="cpu")
    assert first == second and len(calls) == 1
    # Retraining into the same folder (new weights file) is noticed.
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    predict(images / "a.jpg", model=str(model_dir), device="cpu")
    assert len(calls) == 2


def test_predict_accepts_a_loaded_model_and_load_model_is_exported(model_dir: Path, images: Path) -> None:
    from derm_accel import load_model, predict

    model, labels = load_model(str(model_dir))
    assert labels == LABELS
    direct = predict(images / "a.jpg", model=model)[0]
    by_path = predict(images / "a.jpg", model=str(model_dir))[0]
    assert direct["label"] == by_path["label"]
    assert direct["probability"] == pytest.approx(by_path["probability"], abs=1e-6)


def test_bad_arguments_fail_clearly(model_dir: Path, images: Path, tmp_path: Path) -> None:
    from derm_accel import predict

    with pytest.raises(ValueError, match="top_k"):
        predict(images, model=str(model_dir), top_k=0)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        predict(images, model=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No such model folder"):
        predict(images, model=str(tmp_path / "nope" / "deeper" / "x"))


def test_import_is_light() -> None:
    code = "import sys, derm_accel; assert callable(derm_accel.predict); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_predict_json(model_dir: Path, images: Path) -> None:
    typer_testing = pytest.importorskip("typer.testing")
    from derm_accel.cli import app

    runner = typer_testing.CliRunner()
    result = runner.invoke(app, ["predict", str(images), "--model", str(model_dir), "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and all(len(r["top_k"]) == 2 and r["label"] in LABELS for r in rows)
    bad = images.parent / f"{images.name}-bad" / "fake.jpg"
    result = runner.invoke(app, ["predict", str(images / "a.jpg"), str(bad), "--model", str(model_dir), "--json"])
    assert result.exit_code == 1  # one file failed; the other was still predicted
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert "label" in rows[0] and "error" in rows[1]


def test_hub_model_loads_once_then_works_offline(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Push to the local Hub, predict online in a fresh process, stop the server, predict offline."""
    paths = [str(images / "a.jpg"), str(images / "b.png")]
    local = _predict_json(paths, str(model_dir))
    code = f"""
import json
from derm_accel import predict
print("OUT=" + json.dumps(predict({paths!r}, model={REPO_ID!r})))
try:
    predict({paths!r}, model="derm-lab/pickled-only")
except FileNotFoundError as e:
    print("REFUSED=" + str(e))
"""
    hf_home = tmp_path / "hf_home"
    with LocalHubServer(token=TOKEN) as hub:
        _publish(hub, model_dir, monkeypatch)
        online = run_python(code, hub_env(hub.url, hf_home, HF_TOKEN=TOKEN))
        downloads = [a for a in hub.attempts if a == "resolve-get"]
        assert len(downloads) == 2  # config.json and model.safetensors, nothing pickled
        url = hub.url
    results = json.loads(online.stdout.split("OUT=")[1].splitlines()[0])
    assert [r["label"] for r in results] == [r["label"] for r in local]
    assert [r["probability"] for r in results] == pytest.approx([r["probability"] for r in local], abs=1e-6)
    assert "only from safetensors" in online.stdout.split("REFUSED=")[1]

    # Server gone and offline mode on: the cached snapshot is used.
    offline = run_python(code, hub_env(url, hf_home, HF_HUB_OFFLINE="1"))
    assert json.loads(offline.stdout.split("OUT=")[1].splitlines()[0]) == results


def _predict_json(paths: list[str], model: str) -> list[dict]:
    from derm_accel import predict

    return predict(paths, model=model)


def _publish(hub: LocalHubServer, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Push RUN/best with derm-accel, and put a repo holding only pickled weights straight into the server."""
    import hashlib

    import huggingface_hub.constants as hf_constants

    from derm_accel.hub.push import push_model
    from tests.hub_server import RepoFileEntry, git_blob_sha1, lfs_pointer

    with monkeypatch.context() as m:
        m.setattr(hf_constants, "ENDPOINT", hub.url)
        m.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        push_model(model_dir, REPO_ID, token=TOKEN)

    state = hub.state
    state.create_repo("derm-lab/pickled-only", private=False)
    repo = state.repos["derm-lab/pickled-only"]
    parent = repo.commits[repo.branches["main"]]
    config = (model_dir / "config.json").read_bytes()
    pickled = b"\x80\x04pickle"
    oid = hashlib.sha256(pickled).hexdigest()
    state.lfs_objects[oid] = pickled
    files = dict(parent.files)
    files["config.json"] = RepoFileEntry("config.json", len(config), git_blob_sha1(config), None, config)
    pointer = lfs_pointer(oid, len(pickled))
    files["pytorch_model.bin"] = RepoFileEntry("pytorch_model.bin", len(pickled), git_blob_sha1(pointer), oid, None)
    repo.branches["main"] = state.new_commit(repo, parent.oid, "pickled weights", "", files).oid
