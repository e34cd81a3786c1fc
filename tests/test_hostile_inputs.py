"""Hostile inputs: nothing silently wrong.

Mismatched or non-finite weights at push and predict, over-long output names, images whose decoding would
take far more memory than their file size suggests.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from derm_accel.cli import app
from derm_accel.data import decode
from derm_accel.data.synthetic import render
from tests.hub_fixtures import write_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("run"))


def _copy_model(model_dir: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in model_dir.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _poison(model_dir: Path) -> None:
    """One weight tensor set to NaN, as a diverged run leaves it."""
    weights = model_dir / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim > 1)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights))


# -- push ------------------------------------------------------------------------------------------------------


def test_push_refuses_a_config_that_names_another_architecture(model_dir: Path, tmp_path: Path) -> None:
    from derm_accel.hub.push import push_model

    bad = _copy_model(model_dir, tmp_path / "best")
    config = json.loads((bad / "config.json").read_text())
    config["architecture"] = "test_resnet"  # the weights are test_efficientnet's
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit the architecture 'test_resnet'") as info:
        push_model(bad, "lab/x", dry_run=True, out=tmp_path / "staged")
    assert "config.json" in str(info.value) and "model.safetensors" in str(info.value)
    assert not (tmp_path / "staged").exists()


def test_push_refuses_non_finite_weights(model_dir: Path, tmp_path: Path) -> None:
    bad = _copy_model(model_dir, tmp_path / "best")
    _poison(bad)
    result = CliRunner().invoke(
        app, ["push", str(bad), "--repo-id", "lab/x", "--dry-run", "--out", str(tmp_path / "staged")]
    )
    assert result.exit_code == 2 and "NaN or inf" in result.output, result.output
    assert not (tmp_path / "staged").exists()


def test_push_still_stages_a_sound_model(model_dir: Path, tmp_path: Path) -> None:
    from derm_accel.hub.push import push_model

    staged = Path(push_model(model_dir, "lab/x", dry_run=True, out=tmp_path / "staged"))
    assert (staged / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


# -- predict ---------------------------------------------------------------------------------------------------


def test_predict_refuses_nan_weights_and_never_prints_nan(model_dir: Path, tmp_path: Path) -> None:
    from derm_accel.inference.predict import NonFiniteOutputError, predict
    from derm_accel.models.load import load_model

    bad = _copy_model(model_dir, tmp_path / "best")
    _poison(bad)
    image = tmp_path / "a.jpg"
    render(0, seed=1, size=64).save(image)
    result = CliRunner().invoke(app, ["predict", str(image), "--model", str(bad), "--json"])
    assert result.exit_code == 2 and "NaN" in result.output and "model.safetensors" in result.output
    assert '"probability"' not in result.output
    # An already loaded model with NaN weights: the outputs are checked too.
    net, _ = load_model(str(model_dir))
    with torch.no_grad():
        next(p for p in net.parameters() if p.ndim > 1).fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="NaN/inf outputs for 1 of 1 images"):
        predict(str(image), net, device="cpu")


# -- explain ---------------------------------------------------------------------------------------------------


def test_explain_shortens_long_names_uniquely_and_one_failure_does_not_stop_the_rest(tmp_path: Path) -> None:
    from derm_accel.models.build import create_model, export_model

    torch.manual_seed(0)
    model = export_model(create_model("test_resnet", 2), tmp_path / "best", ["a", "b"])
    src = tmp_path / "in"
    src.mkdir()
    long_a, long_b = "x" * 240 + "a" * 10, "x" * 240 + "b" * 10  # 254-byte names, equal for 240 bytes
    for i, stem in enumerate((long_a, long_b, "blocked", "zz_last")):
        render(i % 2, seed=i, size=48).save(src / f"{stem}.png")
    out = tmp_path / "heat"
    (out / "blocked_gradcam.png").mkdir(parents=True)  # a name that cannot be written
    result = CliRunner().invoke(app, ["explain", str(src), "--model", str(model), "--out", str(out)])
    assert result.exit_code == 1, result.output
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(names) == 3 and all(len(n.encode()) <= 255 for n in names)
    assert "zz_last_gradcam.png" in names  # explained after the file that failed
    long_names = [n for n in names if n.startswith("xxx")]
    assert len(set(long_names)) == 2 and all(n.endswith("_gradcam.png") for n in long_names)
    assert "blocked.png\tERROR" in result.output


def test_fit_name_keeps_short_names_and_cuts_multibyte_names_on_a_character() -> None:
    from derm_accel.core.paths import fit_name

    assert fit_name("lesion", ".png") == "lesion.png"
    name = fit_name("é" * 200, "_gradcam.png")
    assert len(name.encode()) <= 255 and name.endswith("_gradcam.png") and name.startswith("é")
    assert fit_name("é" * 200 + "1", ".png") != fit_name("é" * 200 + "2", ".png")


def test_evaluate_report_folder_name_fits_for_a_long_run_name() -> None:
    from derm_accel.evaluation.run import default_out_dir

    long_run = "r" * 250  # a valid folder name, but "<run>-best-test" is not
    name = default_out_dir(f"runs/{long_run}/best", "test").name
    assert len(name.encode()) <= 255 and name.endswith("-test") and name.startswith("r" * 200)
    assert default_out_dir("runs/x/best", "test") == Path("reports/x-best-test")


# -- decode budget ---------------------------------------------------------------------------------------------


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9000x9000 pixels (81 MP, under the 89 MP header limit) in about 80 kB: ~1 GB to decode and convert."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    path.write_bytes(_png((9000, 9000)))
    return path


def test_huge_png_is_refused_before_decoding_in_predict(model_dir: Path, huge_png: Path) -> None:
    from derm_accel.inference.predict import predict

    assert huge_png.stat().st_size < 200_000
    (result,) = predict(str(huge_png), str(model_dir), device="cpu")
    assert "decode budget" in result["error"] and "9000x9000" in result["error"]
    with pytest.raises(decode.ImageTooLargeError, match="decode budget"):
        decode.open_bounded(huge_png.read_bytes())


def test_huge_png_is_refused_by_serve_with_a_4xx(model_dir: Path, huge_png: Path) -> None:
    from fastapi.testclient import TestClient

    from derm_accel.serving.serve import create_app

    client = TestClient(create_app(str(model_dir), device="cpu"))
    answer = client.post("/predict", content=huge_png.read_bytes())
    assert answer.status_code == 400 and "decode budget" in answer.json()["error"]
    assert client.get("/health").status_code == 200


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    from derm_accel.data.transforms import decode_image

    monkeypatch.setattr(decode, "MAX_DECODE_PIXELS", 1_000_000)
    buf = io.BytesIO()
    render(0, seed=0, size=200).resize((1600, 1600)).save(buf, format="JPEG", quality=90)  # 2.56 MP
    jpeg = buf.getvalue()
    assert decode_image({"bytes": jpeg}).size == (800, 800)  # 1/2 scale: 0.64 MP
    assert decode_image({"bytes": jpeg}, 150).size == (200, 200)  # draft for min_size still applies
    with pytest.raises(decode.ImageTooLargeError, match="only JPEGs are decoded at reduced scale"):
        decode_image({"bytes": _png((1600, 1600))})
    stored = decode.decode_bytes(0, jpeg, decode.DecodeOptions(max_size=320))
    assert stored.reason is None and (stored.width, stored.height) == (1600, 1600)  # the original's size
    assert Image.open(io.BytesIO(stored.jpeg)).size == (320, 320)
    refused = decode.decode_bytes(1, _png((1600, 1600)), decode.DecodeOptions())
    assert refused.reason == "too_large" and "decode budget" in refused.detail


def test_pixel_budget_lets_decodes_run_together_only_while_their_bytes_fit() -> None:
    budget = decode.PixelBudget(100)
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with budget.hold(60):
            order.append("first in")
            first_in.set()
            time.sleep(0.2)
            order.append("first out")

    def second() -> None:
        first_in.wait()
        with budget.hold(60):
            order.append("second in")

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first in", "first out", "second in"]
    with budget.hold(30), budget.hold(70):  # fit together
        assert budget.in_use == 100
    # Larger than the budget: it runs alone, and anything else waits.
    with budget.hold(1000), pytest.raises(TimeoutError), budget.hold(1, timeout=0.05):
        pass
    assert budget.in_use == 0


# -- convert ---------------------------------------------------------------------------------------------------

FAST = {"progress": False, "max_size": 32}


def _classes(root: Path, good: dict[str, int], bad: dict[str, int] | None = None) -> Path:
    """Class folders with ``good[c]`` decodable JPEGs and ``bad[c]`` text files named .jpg."""
    for ci, (name, n) in enumerate(good.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            render(ci, seed=i, size=40).save(root / name / f"g{i}.jpg")
    for name, n in (bad or {}).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"b{i}.jpg").write_text("not an image")
    return root


def test_convert_fails_with_a_report_when_nothing_converts(tmp_path: Path) -> None:
    src = _classes(tmp_path / "src", {}, {"melanoma": 2, "nevus": 1})
    out = tmp_path / "data"
    result = CliRunner().invoke(app, ["convert", str(src), str(out)])
    assert result.exit_code == 2 and "No image" in result.output and "conversion_report.json" in result.output
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["status"] == "failed" and report["rows_total"] == 0 and report["skipped_total"] == 3
    assert report["skipped_by_reason"] == {"not_an_image": 3}
    # Fixed files: the next run replaces the failed report without --overwrite.
    _classes(src, {"melanoma": 3, "nevus": 3})
    for path in src.rglob("b*.jpg"):
        path.unlink()
    from derm_accel.data.convert import convert_folders

    assert convert_folders(src, out, **FAST)["rows_total"] == 6


def test_a_class_left_without_images_is_refused_by_name_or_dropped(tmp_path: Path) -> None:
    from datasets import load_from_disk

    from derm_accel.data.convert import ConvertError, convert_folders

    src = _classes(tmp_path / "src", {"melanoma": 5, "nevus": 5}, {"psoriasis": 3})
    with pytest.raises(ConvertError, match=r"\['psoriasis'\].*--drop-empty-classes"):
        convert_folders(src, tmp_path / "refused", **FAST)
    assert json.loads((tmp_path / "refused" / "conversion_report.json").read_text())["empty_classes"] == [
        "psoriasis"
    ]
    report = convert_folders(src, tmp_path / "dropped", drop_empty_classes=True, **FAST)
    assert report["class_names"] == ["melanoma", "nevus"] and report["dropped_empty_classes"] == ["psoriasis"]
    data = load_from_disk(str(tmp_path / "dropped"))
    assert data["train"].features["label"].names == ["melanoma", "nevus"]
    rows = [r for split in data.values() for r in split]
    assert len(rows) == 10
    assert all(r["source_path"].startswith(data["train"].features["label"].int2str(r["label"])) for r in rows)


def test_links_leading_outside_the_source_are_skipped_unless_asked(tmp_path: Path) -> None:
    from derm_accel.data.convert import convert_folders

    src = _classes(tmp_path / "src", {"melanoma": 3, "nevus": 3})
    elsewhere = _classes(tmp_path / "private", {"other": 2})
    (src / "melanoma" / "link.jpg").symlink_to(elsewhere / "other" / "g0.jpg")
    (src / "nevus" / "linked_folder").symlink_to(elsewhere / "other", target_is_directory=True)
    (src / "nevus" / "inside.jpg").symlink_to(src / "melanoma" / "g1.jpg")  # stays in the tree: kept
    report = convert_folders(src, tmp_path / "strict", **FAST)
    external = sorted(s["path"] for s in report["skipped"] if s["reason"] == "external_link")
    assert external == ["melanoma/link.jpg", "nevus/linked_folder/g0.jpg", "nevus/linked_folder/g1.jpg"]
    assert "--follow-external-links" in report["skipped"][0]["detail"] or any(
        "--follow-external-links" in s["detail"] for s in report["skipped"]
    )
    followed = convert_folders(src, tmp_path / "followed", follow_external_links=True, **FAST)
    assert not any(s["reason"] == "external_link" for s in followed["skipped"])
    assert followed["files_total"] == report["files_total"]


def test_stale_temporary_folders_of_killed_runs_are_removed_and_only_those(tmp_path: Path) -> None:
    import subprocess
    import sys

    from derm_accel.data.convert import convert_folders
    from derm_accel.data.tempdirs import MARKER, make_temp_dir

    src = _classes(tmp_path / "src", {"melanoma": 3, "nevus": 3})
    out = tmp_path / "data"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = make_temp_dir(out, "tmp")  # as a convert killed with -9 leaves it
    (killed / "staging.arrow").write_bytes(b"\0" * 1000)
    owner = json.loads((killed / MARKER).read_text())
    (killed / MARKER).write_text(json.dumps({**owner, "pid": int(dead.stdout)}))
    running = make_temp_dir(out, "tmp")  # this very process: a run still going
    foreign = tmp_path / f"{killed.name[:-8]}zzzzzzzz"  # our name pattern, but no marker: not provably ours
    foreign.mkdir()
    convert_folders(src, out, **FAST)
    assert not killed.exists() and running.exists() and foreign.exists()

