"""evaluate --subgroups and --label-map on a dataset converted from a flat folder plus a metadata table: every
subgroup number recomputed with scikit-learn from predictions.csv; a class the model does not know is reported
apart and never scored."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from typer.testing import CliRunner

from derm_accel.cli import app
from derm_accel.data.convert import convert_folders
from derm_accel.data.metadata import metadata_spec
from derm_accel.data.synthetic import render
from derm_accel.evaluation import LabelMismatchError, evaluate_model
from derm_accel.evaluation.subgroups import (
    MISSING,
    fitzpatrick_bin,
    group_metrics,
    group_values,
    parse_subgroups,
    worst_group_gaps,
)
from derm_accel.hub.card import build_model_card
from derm_accel.models.build import create_model, export_model

MODEL_LABELS = ["melanoma", "nevus"]
DATA_CLASSES = {"MEL": 0, "NEV": 1, "BOD": 2}  # BOD (Bowen's disease) is unknown to the model
N = 72


def _metadata_rows() -> list[dict]:
    rows = []
    for i in range(N):
        dx = ["MEL", "NEV", "BOD"][i % 3] if i % 8 else "NEV"
        rows.append(
            {
                "img_id": f"PAT_{i:03d}.png",
                "diagnostic": dx,
                "age": "" if i % 11 == 0 else str(18 + (i * 7) % 70),
                "fitspatrick": "" if i % 9 == 0 else str(1 + i % 6),
                "gender": ["FEMALE", "MALE"][i % 2],
                "patient_id": f"PAT_{i // 2}",
            }
        )
    return rows


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("external")
    src = root / "images"
    src.mkdir()
    rows = _metadata_rows()
    for i, row in enumerate(rows):
        render(DATA_CLASSES[row["diagnostic"]] if row["diagnostic"] != "BOD" else 3, 3000 + i, 40).save(
            src / row["img_id"]
        )
    table = root / "metadata.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = root / "data"
    convert_folders(
        src,
        data,
        metadata=metadata_spec(table, preset="pad-ufes-20"),
        eval_only=True,
        progress=False,
        near_threshold=-1,
        max_size=0,
    )
    model = _model(root / "model")
    label_map = root / "pad_to_model.yaml"
    label_map.write_text("MEL: melanoma\nNEV: nevus\nBOD: null\n")
    out = root / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--batch-size",
            "16",
            "--label-map",
            str(label_map),
            "--subgroups",
            "fitspatrick,age,gender",
        ],
    )
    assert result.exit_code == 0, result.output
    return {"data": data, "model": model, "out": out, "rows": rows, "label_map": label_map}


def _model(out: Path) -> Path:
    """An untrained test_resnet with a widened random head: accuracy does not matter here, only that its
    answers and probabilities vary from image to image (no metric is degenerate)."""
    torch.manual_seed(0)
    net = create_model("test_resnet", len(MODEL_LABELS))
    with torch.no_grad():
        net.get_classifier().weight.normal_(0, 3.0)
    net.eval()
    net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    return export_model(net, out, MODEL_LABELS)


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _sklearn_metrics(rows: list[dict]) -> dict:
    y = np.array([MODEL_LABELS.index(r["true_label"]) for r in rows])
    probs = np.array([[float(r[c]) for c in MODEL_LABELS] for r in rows])
    pred = probs.argmax(axis=1)
    present = np.unique(y)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y, pred)
    return {
        "n": len(y),
        "accuracy": float((y == pred).mean()),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "roc_auc": float(np.mean(aucs)) if aucs else None,
    }


def test_subgroup_metrics_recompute_from_predictions(external):
    out = external["out"]
    predictions = _csv(out / "predictions.csv")
    assert {p["predicted_label"] for p in predictions} == set(MODEL_LABELS)  # not a constant answer
    table = _csv(out / "subgroups.csv")
    assert list(table[0])[:5] == ["column", "binning", "value", "n", "small_group"]
    assert {r["column"] for r in table} == {"fitspatrick", "age", "gender"}
    for row in table:
        members = [p for p in predictions if p[f"{row['column']}_group"] == row["value"]]
        expected = _sklearn_metrics(members)
        assert int(row["n"]) == expected["n"] > 0
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
            if expected[metric] is None:
                assert row[metric] == "" and row[f"{metric}_ci_low"] == ""
                continue
            assert float(row[metric]) == pytest.approx(expected[metric], abs=1e-5)
            low, high = float(row[f"{metric}_ci_low"]), float(row[f"{metric}_ci_high"])
            assert 0.0 <= low <= high <= 1.0
        assert row["small_group"] == "yes"  # every group here is under 30 images
    groups = {r["column"]: [t["value"] for t in table if t["column"] == r["column"]] for r in table}
    assert groups["fitspatrick"] == ["I-II", "III-IV", "V-VI", MISSING]
    assert groups["age"][0] == "10-19" and groups["age"][-1] == MISSING
    assert groups["gender"] == ["FEMALE", "MALE"]
    # The raw values travel with the groups: the binning can be checked row by row.
    for p in predictions:
        if p["fitspatrick"]:
            assert p["fitspatrick_group"] == fitzpatrick_bin(float(p["fitspatrick"]))
        if p["age"]:
            decade = int(p["age"]) // 10 * 10
            assert p["age_group"] == f"{decade}-{decade + 9}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["subgroups"]["worst_group_gap"]["gender"]["accuracy"] is None  # groups under 30 are not compared
    assert (out / "subgroups.png").read_bytes().startswith(b"\x89PNG")
    report = (out / "report.md").read_text()
    assert "## Performance across subgroups" in report and "fewer than 30 images" in report
    card = str(build_model_card(external["model"], "lab/model", report_dir=out, license="apache-2.0"))
    assert "## Performance across subgroups" in card and "eval/subgroups.csv" in card


def test_unknown_class_is_reported_apart_not_scored(external):
    out = external["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = external["rows"]
    known = [r for r in rows if r["diagnostic"] != "BOD"]
    ext = metrics["external_validation"]
    assert metrics["label_names"] == MODEL_LABELS and metrics["num_samples"] == len(known)
    assert ext["scored_images"] == len(known) and ext["unscored_images"] == N - len(known)
    assert ext["label_map"] == {"BOD": None, "MEL": "melanoma", "NEV": "nevus"}
    assert list(ext["unknown_classes"]) == ["BOD"] and ext["unknown_classes"]["BOD"]["n"] == N - len(known)
    assert sum(ext["unknown_classes"]["BOD"]["predicted_as"].values()) == N - len(known)
    predictions = _csv(out / "predictions.csv")
    assert {p["true_label"] for p in predictions} == set(MODEL_LABELS) and len(predictions) == len(known)
    assert metrics["accuracy"] == pytest.approx(_sklearn_metrics(predictions)["accuracy"], abs=1e-6)
    unscored = _csv(out / "predictions_unscored.csv")
    assert {u["dataset_label"] for u in unscored} == {"BOD"} and len(unscored) == N - len(known)
    truth = {r["img_id"]: r["diagnostic"] for r in rows}
    assert all(truth[u["source_path"]] == "BOD" for u in unscored)
    assert "not scored" in (out / "report.md").read_text()
    card = build_model_card(external["model"], "lab/model", report_dir=out, license="apache-2.0")
    assert {r.dataset_name for r in card.data.eval_results} == {"data"}  # the external set, not the training set


def test_label_map_errors_are_clear(external, tmp_path):
    with pytest.raises(LabelMismatchError, match="--label-map"):
        evaluate_model(str(external["model"]), external["data"], out_dir=tmp_path / "r", num_workers=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("MEL: melanocytic\n")
    with pytest.raises(ValueError, match="not model classes"):
        evaluate_model(str(external["model"]), external["data"], out_dir=tmp_path / "r", label_map=bad)
    with pytest.raises(ValueError, match="skin_colour"):
        evaluate_model(
            str(external["model"]),
            external["data"],
            out_dir=tmp_path / "r",
            label_map=external["label_map"],
            subgroups="skin_colour",
        )


def test_binning_and_worst_group_gap():
    assert [fitzpatrick_bin(v) for v in (1, 2.0, "III", "4", 5, 6, 12, 34, 56, 7)] == [
        "I-II",
        "I-II",
        "III-IV",
        "III-IV",
        "V-VI",
        "V-VI",
        "I-II",
        "III-IV",
        "V-VI",
        "7",
    ]
    labels, order, kind = group_values("age_approx", [45.0, None, 5, 89])
    assert (labels, order, kind) == (["40-49", MISSING, "0-9", "80-89"], ["0-9", "40-49", "80-89", MISSING], "decade")
    labels, order, kind = group_values("diameter", list(range(1, 21)))
    assert kind == "quartile" and len(order) == 4 and labels[0] == order[0] and labels[-1] == order[-1]
    assert parse_subgroups("age, site:value") == [("age", "auto"), ("site", "value")]
    with pytest.raises(ValueError, match="60 distinct values"):
        group_values("patient_id", [f"P{i}" for i in range(60)])
    for bad in ("age,age", "age,age_group", "age:weekly"):
        with pytest.raises(ValueError, match="--subgroups"):
            parse_subgroups(bad)
    rows = [
        {"column": "skin", "value": "I-II", "n": 40, "accuracy": 0.9, "balanced_accuracy": 0.8},
        {"column": "skin", "value": "V-VI", "n": 35, "accuracy": 0.6, "balanced_accuracy": 0.5},
        {"column": "skin", "value": "III-IV", "n": 5, "accuracy": 0.1, "balanced_accuracy": 0.1},
        {"column": "skin", "value": MISSING, "n": 50, "accuracy": 0.0, "balanced_accuracy": 0.0},
    ]
    gap = worst_group_gaps(rows, min_n=30)["skin"]
    assert gap["groups_compared"] == 2 and gap["accuracy"]["worst_group"] == "V-VI"
    assert gap["accuracy"]["gap"] == pytest.approx(0.3) and gap["balanced_accuracy"]["gap"] == pytest.approx(0.3)
    one = group_metrics(np.array([0, 0, 0]), np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2]]), n_resamples=50)
    assert one["roc_auc"] is None and one["roc_auc_ci"] is None and one["accuracy"] == pytest.approx(2 / 3)


def _reference_bootstrap(y: np.ndarray, probs: np.ndarray, n_resamples: int, rng: np.random.Generator) -> dict:
    """The per-group bootstrap as it was before ranks were computed once: one rankdata per class per resample."""
    from scipy.stats import rankdata

    from derm_accel.evaluation.subgroups import METRICS

    n, num_classes = probs.shape
    pred = probs.argmax(axis=1)
    chunk = max(1, 2_000_000 // (n * num_classes))
    out: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        yy, pp = y[idx], pred[idx]
        offset = np.arange(b)[:, None] * num_classes
        size = b * num_classes
        hit = yy == pp
        tp = np.bincount((offset + yy)[hit], minlength=size).reshape(b, num_classes)
        true = np.bincount((offset + yy).ravel(), minlength=size).reshape(b, num_classes)
        predicted = np.bincount((offset + pp).ravel(), minlength=size).reshape(b, num_classes)
        present = true > 0
        recall = np.divide(tp, true, out=np.zeros((b, num_classes)), where=present)
        f1 = np.divide(2 * tp, true + predicted, out=np.zeros((b, num_classes)), where=(true + predicted) > 0)
        out["accuracy"].append(hit.mean(axis=1))
        out["balanced_accuracy"].append((recall * present).sum(axis=1) / present.sum(axis=1))
        out["macro_f1"].append((f1 * present).sum(axis=1) / present.sum(axis=1))
        aucs = np.full((b, num_classes), np.nan)
        for c in range(num_classes):
            positive = yy == c
            npos = positive.sum(axis=1)
            valid = (npos > 0) & (npos < n)
            if valid.any():
                ranks = rankdata(probs[idx[valid], c], axis=1)
                pos, k = positive[valid], npos[valid]
                aucs[valid, c] = ((ranks * pos).sum(axis=1) - k * (k + 1) / 2) / (k * (n - k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["roc_auc"].append(np.nanmean(aucs, axis=1))
        done += b
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize(("n", "num_classes", "decimals"), [(9, 3, 1), (40, 5, 1), (250, 6, 2), (250, 6, 8)])
def test_bootstrap_with_ranks_once_matches_a_rankdata_per_resample(n: int, num_classes: int, decimals: int) -> None:
    """Same resamples (same seed), same numbers: tied scores (rounded probabilities), classes missing from some
    resamples (tiny groups) and a class absent from the group."""
    from derm_accel.evaluation.subgroups import METRICS, _bootstrap

    rng = np.random.default_rng(n + decimals)
    y = rng.integers(0, num_classes, n)
    if n > 20:
        y[y == num_classes - 1] = 0  # a class with a probability column but no image in the group
    probs = rng.dirichlet(np.ones(num_classes), n).round(decimals)
    expected = _reference_bootstrap(y, probs, 300, np.random.default_rng(5))
    got = _bootstrap(y, probs, 300, np.random.default_rng(5))
    for metric in METRICS:
        np.testing.assert_allclose(got[metric], expected[metric], rtol=0, atol=1e-12, err_msg=metric)
    assert np.isnan(got["roc_auc"]).sum() == np.isnan(expected["roc_auc"]).sum()
    assert np.nanstd(got["roc_auc"]) > 0  # resamples differ: not a constant that matches by accident


def test_bootstrap_auc_of_one_resample_equals_scikit_learn_on_the_resampled_rows() -> None:
    """With all weight on a known resample, the interval's AUC samples are scikit-learn's AUCs of those rows."""
    from derm_accel.evaluation.subgroups import _auc_layout, _weighted_aucs

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60).round(1)
    idx = rng.integers(0, 60, (4, 60))
    layout, spans = _auc_layout(y, probs)
    weights = np.stack([np.bincount(i, minlength=60) for i in idx], axis=1).astype(float)
    aucs = _weighted_aucs(layout @ weights, spans, 3)
    for r, i in enumerate(idx):
        for c in range(3):
            assert aucs[r, c] == pytest.approx(roc_auc_score(y[i] == c, probs[i, c]), abs=1e-12)
