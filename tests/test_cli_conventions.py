"""What users of typer/click, tqdm and Hugging Face tools expect of a CLI: --version, enumerated options that
refuse typos, and progress bars that show on a terminal and stay out of pipes, logs and --quiet runs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from typer.testing import CliRunner

import derm_accel
from derm_accel.cli import app
from tests.hub_fixtures import write_model_dir


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from derm_accel.data.synthetic import render

    root = tmp_path_factory.mktemp("photos")
    for i in range(3):
        render(i, seed=i, size=72).save(root / f"{i}.jpg")
    return root


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"derm-accel {derm_accel.__version__}"


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (["convert", "src", "out", "--conflicts", "keep_majority"], "keep-majority"),
        (["evaluate", "--model", "m", "--data", "d", "--tta", "flips"], "flip"),
        (["predict", "x.jpg", "--model", "m", "--backend", "tensorrt"], "onnxruntime"),
        (["export", "m", "out", "--format", "torchscript"], "onnx"),
    ],
)
def test_enumerated_options_refuse_typos_before_running(args: list[str], allowed: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "Invalid value" in result.output and allowed in result.output


def test_a_mistyped_model_path_is_no_hub_lookup(images: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(images), "--model", str(tmp_path / "runs" / "best")])
    assert result.exit_code == 2
    assert "No such model folder" in result.output and "Hub" not in result.output.split("Check")[0]


def test_progress_bars_show_on_a_terminal_only_and_not_when_quiet(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from derm_accel import predict
    from derm_accel.inference.explain import explain

    for progress in (True, False):
        terminal = _Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        predict(str(images), model=str(model_dir), device="cpu", progress=progress)
        explain(str(images), str(model_dir), out_dir=tmp_path / "cam", device="cpu", progress=progress)
        text = terminal.getvalue()
        assert ("predict: 100%" in text and "3/3" in text and "explain: 100%" in text) == progress, text
    pipe = io.StringIO()  # not a terminal (a pipe, a log file): no bar even when asked for
    monkeypatch.setattr("sys.stderr", pipe)
    predict(str(images), model=str(model_dir), device="cpu", progress=True)
    assert pipe.getvalue() == ""


def test_evaluate_shows_inference_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from accelerate import Accelerator
    from datasets import Dataset

    from derm_accel.evaluation.inference import predict_logits
    from derm_accel.models.build import create_model

    rows = Dataset.from_dict({"pixel_values": torch.zeros(6, 3, 32, 32).numpy(), "labels": [0, 1] * 3})
    rows = rows.with_format("torch")
    model = create_model("test_resnet", 2)
    for progress, expected in ((True, "inference: 100%"), (False, "")):
        terminal = _Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        result = predict_logits(model, rows, Accelerator(cpu=True), batch_size=2, num_workers=0, progress=progress)
        assert result.logits.shape == (6, 1, 2)
        assert (expected in terminal.getvalue()) and (progress or terminal.getvalue() == "")
