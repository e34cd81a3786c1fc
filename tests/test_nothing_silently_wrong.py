"""Issue 23: hostile names, leaked models and silent misreadings, each reproduced with the suite's tiny models."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from derm_accel.data.synthetic import write_dataset
from derm_accel.evaluation import evaluate_model
from derm_accel.models.build import create_model, export_model

PACKAGE = Path(__file__).resolve().parents[1] / "derm_accel"
# Class names a spreadsheet runs as formulas, and names that break Markdown tables or write raw HTML.
FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0", "@SUM(A1)"]
MARKDOWN = ["a|b", "x\n# Injected [link](javascript:alert(1))", "<img src=x onerror=alert(1)>"]
HOSTILE = FORMULAS + MARKDOWN


def _untrained(labels: list[str], out: Path, seed: int = 0) -> Path:
    """An untrained test_resnet with a widened random head (its answers vary from image to image)."""
    torch.manual_seed(seed)
    net = create_model("test_resnet", len(labels))
    with torch.no_grad():
        net.get_classifier().weight.normal_(0, 3.0)
    net.eval()
    net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    return export_model(net, out, labels)


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> tuple[dict, Path]:
    """evaluate on a dataset and model whose class names are formulas, table breakers and HTML."""
    root = tmp_path_factory.mktemp("hostile")
    data = write_dataset(root / "data", {"train": [1] * 6, "validation": [1] * 6, "test": [2] * 6}, size=32,
                         names=HOSTILE)
    model = _untrained(HOSTILE, root / "run" / "best")
    out = root / "report"
    metrics = evaluate_model(str(model), data, out_dir=out, num_workers=0, max_thumbnails=0)
    return metrics, out


# ---- 3. CSV formula injection ---------------------------------------------------------------------------


def test_csv_cells_that_start_a_formula_are_quoted_and_numbers_stay_numbers() -> None:
    from derm_accel.core.escape import csv_cell

    for text in ["=1+1", "+1+1", "-1+1", "@A1", "\tx", "\rx", '=HYPERLINK("u")']:
        assert csv_cell(text) == "'" + text
    for value in ["-0.5", "+3", "-1e-05", "melanoma", "", -0.5, -3, 1.25e-9, None]:
        assert csv_cell(value) == value


def test_every_csv_evaluate_writes_escapes_class_names_and_paths(hostile_report) -> None:
    _, out = hostile_report
    predictions = _rows(out / "predictions.csv")
    header, body = predictions[0], predictions[1:]
    for name in FORMULAS:
        assert name not in header and "'" + name in header
    assert body and all(not cell.startswith(("=", "+", "@", "\t", "\r")) for row in body for cell in row)
    # probabilities are still numbers under the quoted names
    probs = np.array([[float(row[header.index("'" + n)]) for n in FORMULAS] for row in body])
    assert np.all((probs >= 0) & (probs <= 1))
    per_class = _rows(out / "per_class.csv")
    assert [r[0] for r in per_class[1:4]] == ["'" + n for n in FORMULAS]
    assert float(per_class[1][1]) >= 0  # precision stays a number


def test_subgroups_oof_and_unscored_csvs_escape_their_cells(tmp_path: Path) -> None:
    from derm_accel.evaluation.label_map import External, LabelMapping
    from derm_accel.evaluation.report import write_predictions_csv
    from derm_accel.evaluation.subgroups import write_subgroups_csv

    row = {"column": "=col", "binning": "value", "value": "@evil()", "n": 3, "small": True,
           **{m: -0.25 for m in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")},
           **{f"{m}_ci": [-0.5, 0.5] for m in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")}}
    cells = _rows(write_subgroups_csv([row], tmp_path / "subgroups.csv"))[1]
    assert cells[:3] == ["'=col", "value", "'@evil()"] and cells[5:8] == ["-0.25", "-0.5", "0.5"]

    path = write_predictions_csv(tmp_path / "oof_predictions.csv", ["-x.jpg"], np.array([0]),
                                 np.array([[0.6, 0.4]]), ["=a", "b"], extra={"fold": [1], "site": ["+1+1"]})
    header, first = _rows(path)
    assert header[4] == "'=a" and first[1] == "'-x.jpg" and first[2] == "'=a" and first[-2:] == ["1", "'+1+1"]

    mapping = LabelMapping(["=data", "known"], ["known", "other"], [-1, 0])
    external = External(mapping, ["@img.jpg"], np.array([0]), torch.zeros(1, 1, 2))
    header, first = _rows(external.write(tmp_path / "predictions_unscored.csv"))
    assert first[:2] == ["'@img.jpg", "'=data"]


def test_no_module_writes_csv_around_the_escaping_writer() -> None:
    offenders = [
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if p.name != "escape.py" and any(s in p.read_text() for s in ("csv.writer(", "csv.DictWriter(", ".to_csv("))
    ]
    assert offenders == []


# ---- 4. class names in Markdown (report.md, model card, ensemble card) ---------------------------------------


def _cells(line: str) -> int:
    """The cells of a GFM table row: ``|`` that is not backslash-escaped separates them."""
    return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))


def _check_markdown(text: str, header: str, columns: int) -> None:
    lines = text.splitlines()
    assert not any(line.lstrip().startswith("# Injected") for line in lines)
    assert "<img" not in text and not re.search(r"(?<!\\)\]\(javascript:", text)  # no tag, no live link
    start = lines.index(next(line for line in lines if line.startswith(header)))
    rows = [line for line in lines[start + 2:start + 2 + len(HOSTILE)]]
    assert len(rows) == len(HOSTILE) and all(_cells(row) == columns for row in rows), rows


def test_report_md_escapes_class_names_in_tables_and_text(hostile_report) -> None:
    _, out = hostile_report
    text = (out / "report.md").read_text()
    _check_markdown(text, "| class | support |", 7)
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "a\\|b" in text


def test_model_card_and_ensemble_card_escape_class_names(hostile_report, tmp_path: Path) -> None:
    from derm_accel.hub.card import build_model_card
    from derm_accel.hub.ensemble_card import build_ensemble_card

    _, out = hostile_report
    model = out.parent / "run" / "best"
    card = str(build_model_card(model, "org/model", report_dir=out, license="mit"))
    _check_markdown(card, "| Class | Precision |", 6)
    classes = next(line for line in card.splitlines() if line.startswith("- **Classes:**"))
    assert "a\\|b" in classes and "&lt;img src=x onerror=alert(1)&gt;" in classes
    second = _untrained(HOSTILE, tmp_path / "second", seed=1)
    ensemble = str(build_ensemble_card([("fold_1", model), ("fold_2", second)], "org/ens", license="mit"))
    assert not any(line.lstrip().startswith("# Injected") for line in ensemble.splitlines())
    assert "<img" not in ensemble and not re.search(r"(?<!\\)\]\(javascript:", ensemble)
    assert "a\\|b" in next(line for line in ensemble.splitlines() if line.startswith("- **Classes:**"))


# ---- 5. inf in metadata is missing data --------------------------------------------------------------------


def test_convert_types_a_numeric_column_with_inf_as_numbers_with_missing_values() -> None:
    from datasets import Value

    from derm_accel.data.tables import infer_feature

    feature, values, kind = infer_feature(["19.5", "inf", "40", None, "-Infinity", "61.25"])
    assert feature == Value("float64") and values == [19.5, None, 40.0, None, None, 61.25]
    assert kind.startswith("float") and "2 infinite" in kind
    feature, values, _ = infer_feature(["3", "INF", "5"])
    assert feature == Value("int64") and values == [3, None, 5]
    feature, values, _ = infer_feature(["inf", "inf"])
    assert feature == Value("float64") and values == [None, None]


@pytest.mark.parametrize("kind", ["quartile", "decade", "auto", "value"])
def test_subgroups_put_infinite_values_in_the_missing_group(kind: str) -> None:
    from derm_accel.evaluation.subgroups import MISSING, group_values

    ages = [19.5, 25.0, 33.0, 47.0, 52.0, 68.0, 71.0, 80.0, 85.0, 90.0, 12.0, 15.0]
    values = [*ages, math.inf, -math.inf, "inf", float("nan"), None]
    labels, order, used = group_values("age_approx", values, kind)
    assert all("nan" not in g and "inf" not in g for g in order), order
    assert labels[len(ages):] == [MISSING] * 5
    assert MISSING not in labels[:len(ages)]
    if used == "quartile":
        assert order[-2].endswith("90]")  # the top bin ends at the largest finite value


# ---- 10. one macro-F1 ------------------------------------------------------------------------------------


def test_every_macro_f1_is_evaluates_over_the_classes_present() -> None:
    """Class 3 has no image but is predicted: every figure leaves it out of the average, as evaluate does."""
    from derm_accel.evaluation import load_metric
    from derm_accel.evaluation.cv_stats import classification_metrics
    from derm_accel.evaluation.members import member_metrics
    from derm_accel.evaluation.subgroups import group_metrics

    rng = np.random.default_rng(0)
    y = rng.choice([0, 1, 2], size=40)
    logits = rng.normal(size=(40, 4)) + 1.2 * np.eye(4)[y]
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    pred = probs.argmax(1)
    assert (pred == 3).any()
    reference = load_metric().compute(predictions=pred, probabilities=probs, references=y, bootstrap=0)["macro_f1"]
    assert classification_metrics(y, pred)["macro_f1"] == pytest.approx(reference)  # k-fold report, soup
    members = member_metrics(torch.from_numpy(logits)[:, None, None, :], y, ["m"])  # ensemble rows
    assert members[0]["macro_f1"] == pytest.approx(reference)
    assert group_metrics(y, probs, n_resamples=10)["macro_f1"] == pytest.approx(reference)  # subgroups


def test_trainings_validation_macro_f1_is_evaluates_on_the_same_split(tmp_path: Path) -> None:
    """A validation split without images of one class: training's figure (best epoch, val_metrics.json) and
    evaluate's are the same number."""
    from derm_accel.training.train import train
    from tests.train_utils import make_dataset, reset_accelerate, tiny_recipe

    data = make_dataset(tmp_path / "data", per_class={"train": [8, 8, 8], "validation": [4, 4, 0], "test": [1, 1, 1]},
                        size=32)
    reset_accelerate()
    run = train(tiny_recipe(data, tmp_path / "run", train={"epochs": 1}))
    reset_accelerate()
    val = json.loads((run / "best" / "val_metrics.json").read_text())
    metrics = evaluate_model(str(run / "best"), data, split="validation", tta="none", out_dir=tmp_path / "rep",
                             num_workers=0, max_thumbnails=0, channels_last=False)
    assert metrics["num_samples"] == val["num_samples"] == 8 and metrics["accuracy"] == pytest.approx(val["accuracy"])
    assert val["macro_f1"] > 0 and metrics["macro_f1"] == pytest.approx(val["macro_f1"])
    assert json.loads((run / "best" / "training_info.json").read_text())["best_val_macro_f1"] == val["macro_f1"]
    # 2: the ids of the images it trained on travel with the model (and validation is no training image)
    from datasets import load_from_disk

    from derm_accel.data.trained_rows import read_training_rows, row_ids

    assert read_training_rows(run / "best") == set(row_ids(load_from_disk(str(data))["train"])) and len(row_ids(
        load_from_disk(str(data))["train"])) == 24


# ---- 11. external validation on a subset of the model's classes ------------------------------------------


def test_an_external_set_with_some_of_the_models_classes_needs_no_label_map(tmp_path: Path) -> None:
    from derm_accel.data.synthetic import class_names

    model_labels = sorted(class_names(4))
    held = [model_labels[2], model_labels[0]]  # another order too: matched by name, never by index
    data = write_dataset(tmp_path / "ext", {"test": [3, 4]}, size=32, names=held)
    first, second = (_untrained(model_labels, tmp_path / f"m{i}", seed=i) for i in (0, 1))
    metrics = evaluate_model([str(first), str(second)], data, out_dir=tmp_path / "rep", num_workers=0,
                             max_thumbnails=0)
    ext = metrics["external_validation"]
    assert ext["matched_by_name"] and ext["scored_images"] == 7 and ext["unscored_images"] == 0
    assert ext["model_classes_without_images"] == [model_labels[1], model_labels[3]]
    assert metrics["label_names"] == model_labels and metrics["num_samples"] == 7
    support = {name: row["support"] for name, row in metrics["per_class"].items()}
    assert support == {model_labels[0]: 4, model_labels[1]: 0, model_labels[2]: 3, model_labels[3]: 0}
    assert metrics["classes_without_samples"] == [model_labels[1], model_labels[3]]
    assert all("macro_f1" in m for m in metrics["ensemble"]["members"])  # members scored alone as well
    rows = _rows(tmp_path / "rep" / "predictions.csv")
    assert sorted(r[2] for r in rows[1:]) == sorted([held[0]] * 3 + [held[1]] * 4)  # true labels by name
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "2 of the model's 4 classes, matched by name" in report
    assert f"Model classes without images in this dataset: {model_labels[1]}, {model_labels[3]}" in report


# ---- 6. two metadata rows, two labels, one image ---------------------------------------------------------


def test_metadata_rows_that_label_one_image_differently_are_a_conflict(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from derm_accel.cli import app
    from derm_accel.data.synthetic import render

    src = tmp_path / "src"
    src.mkdir()
    names = [f"img{i}" for i in range(12)]
    for i, name in enumerate(names):
        render(i % 2, 300 + i, 40).save(src / f"{name}.jpg", quality=90)
    rows = [[n, "nevus" if i % 2 else "melanoma"] for i, n in enumerate(names)]
    rows += [
        ["img0", "nevus"],  # the same file name again, another label: first-wins would call it melanoma
        ["img1.jpg", "melanoma"],  # another spelling of the same file, another label
        ["img3", "nevus"],  # a true duplicate row: same label
    ]
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["image", "dx"], *rows])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--metadata", str(table), "--image-column",
                                      "image", "--label-column", "dx", "--near-threshold", "-1"])
    assert result.exit_code == 0, result.output
    assert "2 files skipped as label conflicts" in result.output
    report = json.loads((out / "conversion_report.json").read_text())
    by_path = {s["path"]: (s["reason"], s["detail"]) for s in report["skipped"]}
    assert by_path["img0.jpg"][0] == "conflict" and "labels.csv:2, labels.csv:14" in by_path["img0.jpg"][1]
    assert by_path["img1.jpg"][0] == "conflict" and "img3.jpg" not in by_path
    meta = report["metadata"]
    assert meta["rows_skipped_by_reason"] == {"conflict": 2, "duplicate_row": 1}
    details = {s["row"]: s["detail"] for s in meta["rows_skipped"] if s["reason"] == "conflict"}
    assert details == {"labels.csv:14": "label 'nevus' here, 'melanoma' in labels.csv:2",
                       "labels.csv:15": "label 'melanoma' here, 'nevus' in labels.csv:3"}
    assert report["rows_total"] == 10


# ---- 2. a model trained on rows of the evaluated split is refused, however it is passed ------------------


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory) -> tuple[Path, Path]:
    """DATA, and RUN as train --folds writes it: fold_1 trained on images of DATA's test split, fold_2 not."""
    from datasets import concatenate_datasets, load_from_disk

    from derm_accel.models.ensemble import write_ensemble

    root = tmp_path_factory.mktemp("folds")
    data = write_dataset(root / "data", {"train": [3, 3], "validation": [1, 1], "test": [2, 2]}, size=32,
                         names=["melanoma", "nevus"])
    dataset = load_from_disk(str(data))
    run = root / "run"
    for k, rows in ((1, concatenate_datasets([dataset["train"], dataset["test"]])), (2, dataset["train"])):
        best = _untrained(["melanoma", "nevus"], run / f"fold_{k}" / "best", seed=k)
        ids = sorted({h[:16] for h in rows["content_hash"]})  # as train writes it: content hashes, 16 digits
        (best / "training_rows.json").write_text(json.dumps({"format": 1, "split": "train", "ids": ids}))
    write_ensemble(run, ["fold_1/best", "fold_2/best"])
    return data, run


@pytest.mark.parametrize("how", ["members", "one fold model", "ensemble folder"])
def test_a_model_trained_on_the_evaluated_split_is_refused_by_name(fold_run, tmp_path: Path, how: str) -> None:
    from derm_accel.core.errors import InputError

    data, run = fold_run
    fold_1, fold_2 = str(run / "fold_1/best"), str(run / "fold_2/best")
    model = {"members": [fold_1, fold_2], "one fold model": fold_1, "ensemble folder": str(run)}[how]
    with pytest.raises(InputError) as info:
        evaluate_model(model, data, split="test", out_dir=tmp_path / "never", num_workers=0)
    message = str(info.value)
    assert "fold_1" in message and "4 of the 4 images of the 'test' split" in message
    assert "training_rows.json" in message
    assert not (tmp_path / "never").exists()


def test_a_model_is_scored_on_images_it_never_trained_on_and_refused_on_its_own(fold_run, tmp_path: Path) -> None:
    from derm_accel.core.errors import InputError

    data, run = fold_run
    metrics = evaluate_model(str(run / "fold_2/best"), data, split="test", out_dir=tmp_path / "ok", num_workers=0,
                             max_thumbnails=0)
    assert metrics["num_samples"] == 4
    with pytest.raises(InputError, match=r"fold_2.*6 of the 6 images of the 'train' split"):
        evaluate_model(str(run / "fold_2/best"), data, split="train", out_dir=tmp_path / "no", num_workers=0)


def test_a_soup_carries_every_members_training_images(fold_run, tmp_path: Path) -> None:
    from derm_accel.training.soup import write_soup

    def ids(folder: Path) -> set[str]:
        return set(json.loads((folder / "training_rows.json").read_text())["ids"])

    _, run = fold_run
    members = [run / "fold_1/best", run / "fold_2/best"]
    soup = write_soup(members, tmp_path / "soup")
    assert (soup / "training_rows.json").is_file() and ids(soup) == ids(members[0]) | ids(members[1])


# ---- 1. k-fold reruns never reuse fold models trained on another split -----------------------------------


def test_a_fold_run_of_another_assignment_is_refused_even_without_fold_data(tmp_path: Path) -> None:
    """train --folds 2, rm -rf RUN/fold_data (it looks like a cache), train --folds 3: refused, naming the fold."""
    import shutil

    from derm_accel.core.errors import InputError
    from derm_accel.data.folds import make_fold_datasets
    from derm_accel.data.selection import load_converted
    from derm_accel.training.config import load_recipe
    from derm_accel.training.kfold import FOLD_ASSIGNMENT, check_fold_runs, fold_assignment
    from tests.train_utils import make_dataset, tiny_recipe

    data = make_dataset(tmp_path / "data", size=32)
    run, fold_data = tmp_path / "cv", tmp_path / "cv" / "fold_data"
    recipe = load_recipe(tiny_recipe(data, run))
    make_fold_datasets(data, fold_data, 2)
    check_fold_runs(run, fold_data, recipe, 2, adopt=False)  # nothing trained yet: nothing to refuse
    old_train = set(load_converted(fold_data / "fold_1")["train"]["source_path"])
    for k in (1, 2):  # what train_folds records in each fold run before its first step
        (run / f"fold_{k}").mkdir()
        (run / f"fold_{k}" / FOLD_ASSIGNMENT).write_text(json.dumps(fold_assignment(recipe, fold_data / f"fold_{k}",
                                                                                    k, 2)))
    trained = [run / "fold_1", run / "fold_2"]

    shutil.rmtree(fold_data)
    make_fold_datasets(data, fold_data, 3, trained=trained)  # no manifest left to compare with
    leaked = old_train & set(load_converted(fold_data / "fold_1")["test"]["source_path"])
    assert leaked  # the kept fold_1 model trained on images the new fold 1 holds out
    with pytest.raises(InputError) as info:
        check_fold_runs(run, fold_data, recipe, 3, adopt=False)
    message = str(info.value)
    assert str(run / "fold_1") in message and "--folds was 2, now 3" in message and "output_dir" in message

    shutil.rmtree(fold_data)  # the same assignment rebuilt: the fold runs are the right ones, kept
    make_fold_datasets(data, fold_data, 2, trained=trained)
    check_fold_runs(run, fold_data, recipe, 2, adopt=False)
    with pytest.raises(InputError, match="the recipe changed"):
        check_fold_runs(run, fold_data, load_recipe(tiny_recipe(data, run), ["optim.lr=0.01"]), 2, adopt=False)
    for k in (1, 2):  # fold runs that record nothing, and no manifest: nothing tells what they saw
        (run / f"fold_{k}" / FOLD_ASSIGNMENT).unlink()
    with pytest.raises(InputError, match=f"records no {FOLD_ASSIGNMENT}"):
        check_fold_runs(run, fold_data, recipe, 2, adopt=False)
    check_fold_runs(run, fold_data, recipe, 2, adopt=True)  # the manifest they were cut with is unchanged
    assert (run / "fold_1" / FOLD_ASSIGNMENT).is_file()
