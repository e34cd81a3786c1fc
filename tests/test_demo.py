"""The Gradio demo shows what predict prints: in a real (headless, system) Chromium driving `derm-accel demo`,
and directly on its building blocks (guard verdicts, the model card summary, Grad-CAM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from derm_accel.inference.predict import predict
from derm_accel.models.build import create_model, export_model
from derm_accel.serving.demo import OUT_OF_DOMAIN, DemoModel, card_summary, describe, example_images
from tests.conftest import DERM_SAMPLE, REPO

CHROMIUM = Path("/usr/bin/chromium")


def _labels() -> list[str]:
    if DERM_SAMPLE.is_dir():
        return sorted(p.name for p in DERM_SAMPLE.iterdir() if p.is_dir())
    return ["melanoma", "nevus", "psoriasis"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny convolutional timm model with the sample's classes, and two example images beside it."""
    torch.manual_seed(0)
    labels = _labels()
    net = create_model("test_efficientnet", len(labels))
    net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, 64, 64))  # fast on two cores
    folder = export_model(net, tmp_path_factory.mktemp("demo") / "best", labels)
    from derm_accel.data.synthetic import render

    (folder / "examples").mkdir()
    for i in range(2):
        render(i, i, 96).save(folder / "examples" / f"example{i}.jpg")
    return folder


@pytest.fixture(scope="module")
def lesion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if DERM_SAMPLE.is_dir():
        return sorted((DERM_SAMPLE / _labels()[3]).glob("*.jpg"))[2]
    from derm_accel.data.synthetic import render

    path = tmp_path_factory.mktemp("img") / "lesion.jpg"
    render(1, 5, 128).save(path, quality=92)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_UPLOAD_MB = 1


def start_demo(model_dir: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    """`derm-accel demo` as a user starts it, in its own process, its temporary files under ``tmp`` (TMPDIR)
    and its output in ``tmp/demo.log`` (a file, never a pipe that could fill up)."""
    port = _free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TMPDIR": str(tmp)}
    env.pop("GRADIO_TEMP_DIR", None)
    with open(tmp / "demo.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "derm_accel", "demo", "--model", str(model_dir), "--port", str(port),
             "--no-share", "--max-upload-mb", str(MAX_UPLOAD_MB)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(30)
                raise AssertionError(f"derm-accel demo did not start:\n{(tmp / 'demo.log').read_text()}") from None
            time.sleep(0.5)


def demo_folder(tmp: Path) -> Path:
    """The one folder the demo keeps its files in."""
    (folder,) = tmp.glob("derm-accel-demo-*")
    return folder


@pytest.fixture(scope="module")
def demo_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-tmp")


@pytest.fixture(scope="module")
def demo_url(model_dir: Path, demo_tmp: Path) -> Iterator[str]:
    proc, url = start_demo(model_dir, demo_tmp)
    yield url
    proc.terminate()
    proc.wait(30)


def _no_server_path(text: str, folder: Path) -> None:
    assert str(folder) not in text and str(folder.parent) not in text, text[:2000]


def test_uploads_over_the_limit_are_refused_and_no_server_path_reaches_the_client(
    demo_url: str, demo_tmp: Path, model_dir: Path, lesion: Path
) -> None:
    big = httpx.post(f"{demo_url}gradio_api/upload", files={"files": ("big.jpg", b"\xff\xd8" + b"0" * 2**21)})
    assert big.status_code == 413  # over --max-upload-mb 1, refused while it streams in
    folder = demo_folder(demo_tmp)
    assert not list(folder.rglob("big.jpg"))
    small = httpx.post(f"{demo_url}gradio_api/upload", files={"files": (lesion.name, lesion.read_bytes())})
    assert small.status_code == 200
    (shown,) = small.json()
    assert shown.startswith("demo-files/") and shown.endswith(lesion.name)  # not the server's absolute path
    _no_server_path(small.text, folder)
    stored = folder / shown.removeprefix("demo-files/")
    assert stored.read_bytes() == lesion.read_bytes()
    served = httpx.get(f"{demo_url}gradio_api/file={shown}")  # the masked name still fetches the file
    assert served.status_code == 200 and served.content == lesion.read_bytes()
    for page in ("", "config", "gradio_api/info"):
        text = httpx.get(f"{demo_url}{page}").text
        _no_server_path(text, folder)
        assert str(model_dir) not in text  # nor where the model lies


def test_an_answered_upload_is_deleted_and_its_answer_names_no_server_path(
    demo_url: str, demo_tmp: Path, model_dir: Path, lesion: Path
) -> None:
    from gradio_client import Client, handle_file

    folder = demo_folder(demo_tmp)
    client = Client(demo_url, verbose=False, download_files=False)
    answer = client.predict(handle_file(str(lesion)), api_name="/classify")
    _, verdict, heat, raw = answer
    expected = predict(str(lesion), model=str(model_dir))[0]
    assert raw["label"] == expected["label"] and "Top class" in verdict
    assert heat["path"].startswith("demo-files/") and heat["url"].split("file=")[1].startswith("demo-files/")
    _no_server_path(json.dumps(answer), folder)
    assert not list(folder.rglob(lesion.name)), "the upload outlived its answer"
    assert sorted(p.name for p in folder.rglob("*.jpg")) == ["example0.jpg", "example1.jpg"]  # examples stay


def test_the_demo_removes_every_file_it_kept_when_it_stops(model_dir: Path, tmp_path: Path, lesion: Path) -> None:
    proc, url = start_demo(model_dir, tmp_path / "tmp")
    try:
        folder = demo_folder(tmp_path / "tmp")
        shown = httpx.post(f"{url}gradio_api/upload", files={"files": ("patient_smith.jpg", lesion.read_bytes())})
        assert (folder / shown.json()[0].removeprefix("demo-files/")).is_file()
    finally:
        proc.send_signal(signal.SIGTERM)  # what kill, systemd and containers send
        proc.wait(60)
    assert not folder.exists(), (tmp_path / "tmp" / "demo.log").read_text()


def test_bad_max_upload_mb_is_refused_before_the_model_loads(model_dir: Path) -> None:
    from typer.testing import CliRunner

    from derm_accel.cli import app
    from derm_accel.serving.serve import MAX_UPLOAD_MB as SERVE_DEFAULT

    result = CliRunner().invoke(app, ["demo", "--model", str(model_dir), "--max-upload-mb", "inf"])
    assert result.exit_code == 2 and "--max-upload-mb must be a finite number of megabytes" in result.output
    defaults = {cmd: next(p.default for p in _command(app, cmd).params if p.name == "max_upload_mb")
                for cmd in ("demo", "serve")}
    assert defaults == {"demo": SERVE_DEFAULT, "serve": SERVE_DEFAULT}


def _command(app, name: str):
    import typer.main

    return typer.main.get_command(app).commands[name]


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found: apt-get install -y chromium")
@pytest.mark.skipif(not DERM_SAMPLE.is_dir(), reason=f"real dermoscopic sample not found at {DERM_SAMPLE}")
def test_browser_upload_shows_the_top_class_of_predict(
    demo_url: str, demo_tmp: Path, model_dir: Path, lesion: Path, tmp_path: Path
) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    expected = predict(str(lesion), model=str(model_dir))[0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            responses: list = []  # every answer the browser got; the text ones may name no server path
            page.on("response", lambda r: responses.append(r))
            page.goto(demo_url)
            notice = page.locator("#notice").inner_text()
            assert "Not a medical device" in notice
            page.get_by_text("Examples").first.wait_for(state="visible", timeout=30_000)  # rendered client-side
            page.locator("#upload input[type=file]").set_input_files(str(lesion))
            page.locator("#verdict").get_by_text("Top class").wait_for(timeout=60_000)
            verdict = page.locator("#verdict").inner_text()
            heading = page.locator("#classes").inner_text().splitlines()
            page.locator("#gradcam img").wait_for(timeout=30_000)
            page.screenshot(path=tmp_path / "demo.png", full_page=True)
            kinds = [(r, r.headers.get("content-type") or "") for r in responses]
            texts = [r.text() for r, kind in kinds
                     if r.ok and ("json" in kind or kind.startswith("text/")) and "event-stream" not in kind]
        finally:
            browser.close()
    shown = re.search(r"Top class: (\S+) \(probability ([0-9.]+)\)", verdict)
    assert shown is not None, verdict
    assert shown.group(1) == expected["label"] and heading[1] == expected["label"]
    assert float(shown.group(2)) == pytest.approx(expected["probability"], abs=5e-5)
    assert f"{round(expected['probability'] * 100)}%" in heading
    assert "no domain guard" in verdict
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert texts
    for text in texts:
        _no_server_path(text, demo_folder(demo_tmp))
        assert str(model_dir) not in text


def test_demo_model_answers_like_predict_with_a_gradcam(model_dir: Path, lesion: Path) -> None:
    run = DemoModel(str(model_dir), top_k=3)
    scores, verdict, heat, raw = run(str(lesion))
    expected = predict(str(lesion), model=str(model_dir))[0]
    expected.pop("path")
    assert raw == expected
    assert list(scores) == [t["label"] for t in expected["top_k"]]
    assert f"probability {expected['probability']:.4f}" in verdict
    assert heat.size == (128, 64)  # the 64 px crop and its overlay side by side


def test_vit_has_no_gradcam_but_still_answers(tmp_path: Path, lesion: Path) -> None:
    torch.manual_seed(0)
    net = create_model("test_vit", 3)
    folder = export_model(net, tmp_path / "vit", ["a", "b", "c"])
    scores, _, heat, raw = DemoModel(str(folder))(str(lesion))
    assert heat is None and raw["label"] in scores


def test_out_of_domain_shows_no_diagnosis_and_abstention_shows_the_reason() -> None:
    top = [{"label": "melanoma", "probability": 0.8}, {"label": "nevus", "probability": 0.2}]
    base = {"label": "melanoma", "probability": 0.8, "top_k": top}
    reason = "out of domain: ood_score 91.0 is above the guard's threshold 12.0"
    scores, text = describe({**base, "ood_score": 91.0, "in_domain": False, "abstain": True, "reason": reason})
    assert scores == {} and text.startswith(OUT_OF_DOMAIN) and "melanoma" not in text and "91.0" in text
    low = "low confidence: top-1 probability 0.80 is under the abstention threshold 0.85"
    scores, text = describe({**base, "ood_score": 3.0, "in_domain": True, "abstain": True, "reason": low})
    assert scores == {"melanoma": 0.8, "nevus": 0.2} and "abstains" in text and low in text
    scores, text = describe({**base, "ood_score": 3.0, "in_domain": True, "abstain": False, "reason": None})
    assert "Top class: **melanoma** (probability 0.8000)" in text and "ood_score 3.0" in text


def test_card_summary_from_the_card_or_the_config(model_dir: Path, tmp_path: Path) -> None:
    from tests.hub_fixtures import write_model_dir

    trained = write_model_dir(tmp_path)
    from_config = card_summary(str(trained))
    assert "test_efficientnet" in from_config and "macro-F1 0.660" in from_config and "nevus" in from_config
    card = tmp_path / "carded"
    shutil.copytree(trained, card)
    (card / "README.md").write_text(
        "---\nlicense: mit\n---\n\n# tiny-derm\n\nA classifier.\n\n## Model details\n\nSmall.\n\n## Limits\n\nMany.\n"
    )
    summary = card_summary(str(card))
    assert summary.startswith("# tiny-derm") and "## Model details" in summary and "Limits" not in summary
    assert "license" not in summary
    assert example_images(model_dir / "examples") == [str(model_dir / "examples" / f"example{i}.jpg") for i in (0, 1)]
    assert example_images(tmp_path / "missing") == []


def test_with_a_domain_guard_an_everyday_photo_gets_no_diagnosis(tmp_path: Path) -> None:
    from derm_accel.data.synthetic import render
    from tests.hub_fixtures import write_model_dir
    from tests.test_guard import natural_photos

    guarded = write_model_dir(tmp_path, guard=True)
    photos = [str(p) for p in natural_photos()]
    flagged = [r["path"] for r in predict(photos, model=str(guarded), device="cpu") if r.get("in_domain") is False]
    assert flagged, "the guard flags none of scikit-image's everyday photos"
    run = DemoModel(str(guarded), device="cpu")
    scores, verdict, heat, raw = run(flagged[0])
    assert scores == {} and heat is None and verdict.startswith(OUT_OF_DOMAIN) and raw["abstain"] is True
    lesions = []
    for i in range(12):  # new renders of the classes the guard was fitted on
        lesions.append(str(tmp_path / f"lesion{i}.png"))
        render(i % 3, seed=1000 + i, size=96).save(lesions[-1])
    passed = [r["path"] for r in predict(lesions, model=str(guarded), device="cpu") if r["in_domain"]]
    assert passed, "the guard flags every new generated lesion"
    scores, verdict, heat, raw = run(passed[0])
    assert raw["in_domain"] is True and scores and heat is not None
    assert "looks like the training images" in verdict or "abstains" in verdict
