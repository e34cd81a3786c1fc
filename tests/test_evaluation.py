"""The evaluate stage on a tiny timm model and a generated DatasetDict; numbers checked with scikit-learn."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from derm_accel.data.synthetic import class_names, render, write_dataset
from derm_accel.evaluation import LabelMismatchError, evaluate_model, load_metric
from derm_accel.evaluation.outputs import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from derm_accel.evaluation.run import default_out_dir
from derm_accel.models.build import create_model, export_model

NAMES = sorted(class_names(4))
# Test split: 13 samples (uneven on two ranks), and the last class has none.
SPLIT_COUNTS = {"train": [2, 2, 2, 2], "validation": [3, 3, 3, 3], "test": [5, 4, 4, 0]}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNGS = ("confusion_matrix.png", "roc_curves.png", "reliability.png", "misclassified_examples.png")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("eval") / "data", SPLIT_COUNTS, size=48, names=NAMES)


def _tiny_model(label_names: list[str], out: Path) -> Path:
    """A test_resnet fitted for a few steps: some right, some wrong answers, so no metric is degenerate."""
    torch.manual_seed(0)
    model = create_model("test_resnet", len(label_names))
    mean = torch.tensor(model.pretrained_cfg["mean"])[:, None, None]
    std = torch.tensor(model.pretrained_cfg["std"])[:, None, None]
    images = [np.array(render(i % 4, 1000 + i, 32)) for i in range(48)]
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y = torch.arange(48) % 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    return export_model(model, out, label_names)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _tiny_model(NAMES, tmp_path_factory.mktemp("run") / "best")


@pytest.fixture(scope="module")
def full_report(model_dir, data_dir, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report_full")
    metrics = evaluate_model(
        str(model_dir),
        data_dir,
        out_dir=out,
        batch_size=4,
        num_workers=0,
        tta="flip",
        calibrate=True,
        max_thumbnails=6,
    )
    return metrics, out


@pytest.fixture(autouse=True)
def _quiet_sklearn_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
        yield


def _read_predictions(path: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([NAMES.index(r["true_label"]) for r in rows])
    probs = np.array([[float(r[n]) for n in NAMES] for r in rows], dtype=np.float32).astype(np.float64)
    return rows, y, probs


def _ece(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    conf, correct = probs.max(1), probs.argmax(1) == y
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:], strict=True):
        mask = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return total


def _bootstrap(y: np.ndarray, pred: np.ndarray, n: int, seed: int) -> dict[str, list[float]]:
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n, len(y)))
    accs, f1s = [], []
    for row in idx:
        present = np.unique(y[row])
        accs.append(np.mean(y[row] == pred[row]))
        f1s.append(f1_score(y[row], pred[row], labels=present, average="macro", zero_division=0))
    return {
        "accuracy": list(np.percentile(accs, [2.5, 97.5])),
        "macro_f1": list(np.percentile(f1s, [2.5, 97.5])),
    }


def _check_against_sklearn(
    metrics: dict, y: np.ndarray, probs: np.ndarray, bootstrap: int, seed: int
) -> None:
    approx = lambda v: pytest.approx(v, abs=1e-6)  # noqa: E731
    pred = probs.argmax(1)
    labels = np.arange(len(NAMES))
    present = np.unique(y)
    assert metrics["num_samples"] == len(y)
    assert metrics["accuracy"] == approx(np.mean(pred == y))
    assert metrics["balanced_accuracy"] == approx(balanced_accuracy_score(y, pred))
    assert metrics["top3_accuracy"] == approx(top_k_accuracy_score(y, probs, k=3, labels=labels))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=present, average=avg, zero_division=0)
        assert (metrics[f"{avg}_precision"], metrics[f"{avg}_recall"], metrics[f"{avg}_f1"]) == (
            approx(p),
            approx(r),
            approx(f),
        )
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    aucs = []
    for c, name in enumerate(NAMES):
        row = metrics["per_class"][name]
        assert row["support"] == s[c]
        if s[c] == 0:
            assert (
                row["recall"] is None
                and row["f1"] is None
                and row["roc_auc"] is None
                and row["pr_auc"] is None
            )
            assert row["precision"] == (approx(0.0) if (pred == c).any() else None)
            continue
        assert (row["precision"], row["recall"], row["f1"]) == (approx(p[c]), approx(r[c]), approx(f[c]))
        auc = roc_auc_score(y == c, probs[:, c])
        aucs.append(auc)
        assert row["roc_auc"] == approx(auc)
        assert row["pr_auc"] == approx(average_precision_score(y == c, probs[:, c]))
    assert metrics["roc_auc_macro"] == approx(np.mean(aucs))
    onehot = (y[:, None] == labels[None]).astype(int)
    assert metrics["roc_auc_micro"] == approx(roc_auc_score(onehot, probs, average="micro"))
    assert metrics["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    assert metrics["ece"] == approx(_ece(y, probs))
    assert metrics["nll"] == pytest.approx(log_loss(y, probs, labels=labels), rel=1e-5)
    expected_ci = _bootstrap(y, pred, bootstrap, seed)
    for key in ("accuracy", "macro_f1"):
        assert metrics["ci95"][key] == [approx(v) for v in expected_ci[key]]
        assert metrics["ci95"][key][0] <= metrics[key] + 1e-9 or key == "macro_f1"


def test_metric_module_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.choice([0, 1, 2], size=60)  # class 3 has no samples but gets predicted
    logits = rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[y]
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    out = load_metric().compute(
        predictions=probs.argmax(1),
        probabilities=probs,
        references=y,
        label_names=NAMES,
        bootstrap=200,
        seed=7,
    )
    assert (probs.argmax(1) == 3).any()
    assert out["classes_without_samples"] == [NAMES[3]]
    _check_against_sklearn(out, y, probs.astype(np.float64), bootstrap=200, seed=7)


def test_rank_based_aucs_match_sklearn_on_tied_scores_and_both_entry_points_agree():
    from derm_accel.evaluation.derm_metrics.derm_metrics import compute_metrics

    rng = np.random.default_rng(11)
    y = rng.choice([0, 1, 2], size=400)
    logits = rng.normal(size=(400, 4)) + np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 1) + 1e-3  # many ties inside every column and across columns (micro)
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    assert len(np.unique(probs[:, 0])) < 40  # the ties are real
    kwargs = dict(predictions=probs.argmax(1), probabilities=probs, references=y, label_names=NAMES, bootstrap=50)
    direct = compute_metrics(**kwargs)
    _check_against_sklearn(direct, y, probs.astype(np.float64), bootstrap=50, seed=0)
    assert load_metric().compute(**kwargs) == direct


def test_report_files_and_metrics_recomputed_from_predictions(full_report):
    metrics, out = full_report
    on_disk = json.loads((out / "metrics.json").read_text())
    returned = dict(metrics)
    assert returned.pop("report_dir") == str(out)  # returned to the caller, not written into metrics.json
    assert on_disk == json.loads(json.dumps(returned))
    for key in (
        "split",
        "num_samples",
        "label_names",
        "model",
        "tta",
        "calibration",
        "ci95",
        "per_class",
        "confusion_matrix",
        "classes_without_samples",
    ):
        assert key in on_disk
    assert on_disk["split"] == "test" and on_disk["label_names"] == NAMES
    rows, y, probs = _read_predictions(out / "predictions.csv")
    assert len(rows) == 13 == on_disk["num_samples"]
    assert list(rows[0]) == ["index", "source_path", "true_label", "predicted_label", *NAMES]
    assert [r["predicted_label"] for r in rows] == [NAMES[i] for i in probs.argmax(1)]
    assert rows[0]["source_path"].endswith(".jpg") and len({r["source_path"] for r in rows}) == 13
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert 0 < on_disk["accuracy"] < 1  # the fixture model is neither useless nor perfect
    _check_against_sklearn(on_disk, y, probs, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)

    with (out / "per_class.csv").open() as f:
        per_class = {r["class"]: r for r in csv.DictReader(f)}
    assert float(per_class[NAMES[0]]["f1"]) == pytest.approx(on_disk["per_class"][NAMES[0]]["f1"])
    assert per_class[NAMES[3]]["recall"] == "" and per_class[NAMES[3]]["support"] == "0"

    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(out / name) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 50

    errors = int(np.sum(probs.argmax(1) != y))
    misc = (out / "misclassifications.md").read_text()
    assert f"{errors} of 13 images" in misc and "misclassified_examples.png" in misc
    report = (out / "report.md").read_text()
    for needle in (
        "## Test-time augmentation: before and after",
        "## Calibration: before and after",
        "## Classes without samples",
        NAMES[3],
        "final",
        *PNGS,
    ):
        assert needle in report, needle


def test_tta_and_calibration_before_after(full_report):
    metrics, _ = full_report
    tta, cal = metrics["tta"], metrics["calibration"]
    assert tta["method"] == "flip" and tta["views"] == ["original", "hflip", "vflip"]
    assert set(tta["before"]) >= {"accuracy", "macro_f1", "ece", "nll", "ci95"}
    # Chain: original -> TTA -> calibrated TTA; the final numbers are the top-level ones.
    assert cal["before"] == tta["after"]
    assert cal["after"]["accuracy"] == metrics["accuracy"] and cal["after"]["ece"] == metrics["ece"]
    assert cal["temperature"] > 0 and cal["validation_samples"] == 12
    assert cal["validation_nll_after"] <= cal["validation_nll_before"] + 1e-9
    assert tta["before"] != tta["after"]  # flipped views change the probabilities


def test_two_processes_match_one_process(full_report, model_dir, data_dir, tmp_path):
    metrics, out1 = full_report
    out2 = tmp_path / "report_2proc"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The documented CPU way: the config file alone must give two gloo ranks (no ACCELERATE_USE_CPU here).
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    config = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu_2proc.yaml"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(port), "-m", "derm_accel", "evaluate",
        "--model", str(model_dir), "--data", str(data_dir), "--out", str(out2),
        "--tta", "flip", "--calibrate", "--batch-size", "4", "--num-workers", "0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("test: accuracy") == 1  # one summary, from the main process
    assert json.loads((out2 / "metrics.json").read_text())["num_samples"] == 13
    rows1, y1, p1 = _read_predictions(out1 / "predictions.csv")
    rows2, y2, p2 = _read_predictions(out2 / "predictions.csv")
    assert len(rows2) == 13
    assert [r["source_path"] for r in rows2] == [r["source_path"] for r in rows1]
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(p2, p1, atol=1e-5)
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["confusion_matrix"] == metrics["confusion_matrix"]
    assert m2["accuracy"] == metrics["accuracy"]
    assert m2["calibration"]["temperature"] == pytest.approx(metrics["calibration"]["temperature"], rel=1e-4)


def test_plain_run_and_default_out_dir(model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_model(str(model_dir), data_dir, batch_size=5, num_workers=0, max_thumbnails=2)
    out = tmp_path / default_out_dir(str(model_dir), "test")
    assert out.name == "run0-best-test" or out.name.endswith("-best-test")
    assert metrics["tta"] is None and metrics["calibration"] is None
    assert metrics["classes_without_samples"] == [NAMES[3]]
    rows, y, probs = _read_predictions(out / "predictions.csv")
    assert len(rows) == 13
    _check_against_sklearn(metrics, y, probs, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)


def test_label_mismatch_is_a_clear_error(data_dir, tmp_path):
    swapped = [NAMES[1], NAMES[0], *NAMES[2:]]
    model = _tiny_model(swapped, tmp_path / "wrong")
    with pytest.raises(LabelMismatchError) as info:
        evaluate_model(str(model), data_dir, out_dir=tmp_path / "never", num_workers=0)
    assert isinstance(info.value, ValueError)
    assert str(swapped) in str(info.value) and str(NAMES) in str(info.value)
    assert not (tmp_path / "never").exists()


def test_calibrating_on_the_evaluated_split_is_refused(model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="validation"):
        evaluate_model(str(model_dir), data_dir, split="validation", calibrate=True, out_dir=tmp_path)


def test_evaluate_scores_like_predict_on_the_same_images(model_dir, data_dir, tmp_path):
    """evaluate decodes Arrow to uint8 tensors (torch resize); predict uses timm's Pillow transform on files."""
    from datasets import Image as ImageFeature
    from datasets import load_from_disk

    from derm_accel.inference.predict import predict

    out = tmp_path / "report"
    evaluate_model(str(model_dir), data_dir, out_dir=out, batch_size=4, num_workers=0)
    rows, _, probs = _read_predictions(out / "predictions.csv")
    test = load_from_disk(str(data_dir))["test"].cast_column("image", ImageFeature(decode=False))
    files = []
    for row in rows:
        path = tmp_path / f"{row['index']}.jpg"
        path.write_bytes(test[int(row["index"])]["image"]["bytes"])
        files.append(path)
    results = predict(files, str(model_dir), top_k=len(NAMES), device="cpu")
    expected = np.array([[{t["label"]: t["probability"] for t in r["top_k"]}[n] for n in NAMES] for r in results])
    assert np.abs(expected - probs).max() < 0.01
    assert (expected.argmax(1) == probs.argmax(1)).all()
