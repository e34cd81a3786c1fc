"""ONNX export: a dynamic-batch graph plus a preprocessing sidecar, and predict on ONNX Runtime that agrees with
PyTorch on real dermoscopic images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install 'derm-accel[onnx]'")

from derm_accel.models.onnx import ONNX_NAME, SIDECAR_NAME, export_onnx
from tests.conftest import DERM_SAMPLE, needs_derm_sample
from tests.hub_fixtures import LABELS, write_model_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """RUN/best and its export, written by the CLI: `derm-accel export RUN/best --format onnx OUT`."""
    from typer.testing import CliRunner

    from derm_accel.cli import app

    model_dir = write_model_dir(tmp_path_factory.mktemp("run"))
    out = tmp_path_factory.mktemp("onnx") / "model-onnx"
    result = CliRunner().invoke(app, ["export", str(model_dir), "--format", "onnx", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    return model_dir, out


def test_export_writes_a_dynamic_batch_graph_and_its_sidecar(exported: tuple[Path, Path]) -> None:
    import onnxruntime as ort

    model_dir, out = exported
    meta = json.loads((out / SIDECAR_NAME).read_text())
    config = json.loads((model_dir / "config.json").read_text())["pretrained_cfg"]
    assert meta["label_names"] == LABELS
    assert meta["opset"] >= 17
    assert meta["parity"]["max_abs_probability_diff"] <= 1e-4
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std"):
        assert meta["preprocessing"][key] == config[key]
    session = ort.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "pixel_values" and isinstance(graph_input.shape[0], str)  # a symbolic batch
    for batch in (1, 5):
        (logits,) = session.run(None, {"pixel_values": np.zeros((batch, *config["input_size"]), np.float32)})
        assert logits.shape == (batch, len(LABELS))


@needs_derm_sample
def test_onnxruntime_predict_matches_pytorch_on_real_images(exported: tuple[Path, Path]) -> None:
    from derm_accel import predict

    model_dir, out = exported
    images = [sorted(folder.glob("*.jpg"))[0] for folder in sorted(DERM_SAMPLE.iterdir()) if folder.is_dir()]
    paths = [str(p) for p in images]
    torch_results = predict(paths, model=str(model_dir), top_k=len(LABELS), device="cpu", guard=False)
    onnx_results = predict(paths, model=str(out), top_k=len(LABELS), backend="onnxruntime")
    assert len(onnx_results) == len(images) >= 5
    for t, o in zip(torch_results, onnx_results, strict=True):
        assert o["label"] == t["label"]
        p_torch = {e["label"]: e["probability"] for e in t["top_k"]}
        p_onnx = {e["label"]: e["probability"] for e in o["top_k"]}
        assert max(abs(p_torch[k] - p_onnx[k]) for k in LABELS) <= 1e-4
        assert o["in_domain"] is None and "ONNX" in o["reason"]  # no guard, and it says so


def test_onnx_backend_needs_an_onnx_export(exported: tuple[Path, Path]) -> None:
    from derm_accel import predict

    model_dir, _ = exported
    with pytest.raises(FileNotFoundError, match="derm-accel export"):
        predict([str(model_dir / "config.json")], model=str(model_dir), backend="onnxruntime")
    with pytest.raises(ValueError, match="backend"):
        predict([str(model_dir / "config.json")], model=str(model_dir), backend="tensorrt")


def test_cli_predict_with_the_onnxruntime_backend(exported: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from derm_accel.cli import app
    from derm_accel.data.synthetic import render

    _, out = exported
    render(0, seed=3, size=80).save(tmp_path / "a.jpg")
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "a.jpg"), "--model", str(out), "--backend", "onnxruntime", "--json"]
    )
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert line["label"] in LABELS and 0 < line["probability"] <= 1
    typo = CliRunner().invoke(app, ["predict", str(tmp_path / "a.jpg"), "--model", str(out), "--backend", "onnx"])
    assert typo.exit_code == 2 and "onnxruntime" in typo.output


def test_export_refuses_to_replace_a_folder_that_is_no_export(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    model_dir, _ = exported
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an ONNX export"):
        export_onnx(model_dir, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("label_names", LABELS[:2], "one name per output of the graph (3)"),
        ("label_names", [*LABELS, "extra"], "one name per output of the graph (3)"),
        ("label_names", [LABELS[0], LABELS[0], LABELS[1]], "distinct"),
        ("tta", "rm -rf /", "null or one of"),
        ("preprocessing.crop_pct", 0, "(0, 1]"),
        ("preprocessing.crop_pct", 1.5, "(0, 1]"),
        ("preprocessing.input_size", [3, -64, 64], "positive integers"),
        ("preprocessing.input_size", [3, 32, 32], "the graph's input shape"),
        ("preprocessing.interpolation", "<script>", "one of"),
        ("preprocessing.std", [0.2, 0.0, 0.2], "each > 0"),
        ("preprocessing.mean", [0.5, 0.5], "3 finite numbers"),
    ],
)
def test_a_sidecar_that_does_not_fit_the_graph_is_refused_by_file_and_key(
    exported: tuple[Path, Path], tmp_path: Path, key: str, value: object, says: str
) -> None:
    """preprocessing.json is validated against the graph and the allowed values before anything is predicted."""
    import shutil

    from derm_accel import predict
    from derm_accel.models.onnx import OnnxClassifier, SidecarError

    _, out = exported
    bad = tmp_path / "bad-onnx"
    shutil.copytree(out, bad)
    meta = json.loads((bad / SIDECAR_NAME).read_text())
    section, _, field = key.rpartition(".")
    (meta[section] if section else meta)[field] = value
    (bad / SIDECAR_NAME).write_text(json.dumps(meta))
    with pytest.raises(SidecarError) as info:
        OnnxClassifier(bad)
    message = str(info.value)
    assert str(bad / SIDECAR_NAME) in message and f"'{key}'" in message and says in message
    assert "derm-accel export" in message
    with pytest.raises(SidecarError, match=key.replace(".", r"\.")):
        predict([str(tmp_path)], model=str(bad), backend="onnxruntime")


def test_a_sound_sidecar_still_loads_with_its_declared_tta(exported: tuple[Path, Path]) -> None:
    from derm_accel.models.onnx import OnnxClassifier

    _, out = exported
    net = OnnxClassifier(out)
    assert net.labels == LABELS and net.default_tta in (None, "flip")
