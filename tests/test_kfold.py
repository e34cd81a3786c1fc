"""k-fold cross-validation: fold assignment, statistics, and ``train --folds`` end to end on generated data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score

from derm_accel.data.folds import assign_folds
from derm_accel.evaluation.cv_stats import mean_sd_ci, paired_difference
from tests.train_utils import make_dataset, reset_accelerate, tiny_recipe


def test_folds_are_stratified_and_keep_groups_together() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    groups = np.arange(90)
    groups[10:14] = 10  # a group of four copies
    groups[40:42] = 40
    rng.shuffle(groups)  # groups spread over classes as they come; only their membership matters
    fold = assign_folds(labels, groups, 3, seed=1)
    assert set(fold.tolist()) == {0, 1, 2}
    for g in np.unique(groups):
        assert len(set(fold[groups == g].tolist())) == 1, f"group {g} split across folds"
    for c in range(3):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 4, counts  # within the size of the largest group
    assert np.array_equal(fold, assign_folds(labels, groups, 3, seed=1))
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(labels, groups, 1)


def test_mean_sd_and_paired_t_interval() -> None:
    a, b = [0.61, 0.55, 0.58, 0.64, 0.52], [0.50, 0.51, 0.49, 0.57, 0.50]
    s = mean_sd_ci(a)
    assert s["mean"] == pytest.approx(np.mean(a)) and s["sd"] == pytest.approx(np.std(a, ddof=1))
    d = paired_difference(a, b)
    diffs = np.subtract(a, b)
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert d["mean"] == pytest.approx(0.066)
    with pytest.raises(ValueError, match="same folds"):
        paired_difference(a, b[:4])


def test_train_folds_writes_fold_runs_out_of_fold_predictions_and_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from derm_accel.cli import app
    from derm_accel.training.kfold import FOLD_SCORES, train_folds

    torch.set_num_threads(2)
    data = make_dataset(tmp_path / "data", size=32)  # 3 classes x 24 images over train/validation/test
    run = tmp_path / "cv"
    recipe = tiny_recipe(data, run, train={"epochs": 1, "max_steps_per_epoch": 2})
    reset_accelerate()
    train_folds(recipe, 3)
    reset_accelerate()

    for k in (1, 2, 3):
        assert (run / f"fold_{k}" / "best" / "model.safetensors").is_file()
    with open(run / "oof_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    sources = [r["source_path"] for r in rows]
    assert len(rows) == 72 and len(set(sources)) == 72  # every image scored exactly once
    from derm_accel.data.selection import load_converted

    assert not list((run / "fold_data").rglob("*.arrow"))  # folds are index selections, not copies
    for k in (1, 2, 3):  # each image was scored by the model whose training folds did not hold it
        fold = load_converted(run / "fold_data" / f"fold_{k}")
        held_out = set(fold["test"]["source_path"])
        assert held_out == {r["source_path"] for r in rows if r["fold"] == str(k)}
        assert not held_out & (set(fold["train"]["source_path"]) | set(fold["validation"]["source_path"]))

    report = json.loads((run / "cv_report.json").read_text())
    names = report["label_names"]
    y = np.array([names.index(r["true_label"]) for r in rows])
    probs = np.array([[float(r[n]) for n in names] for r in rows])
    pred = probs.argmax(1)
    oof = report["out_of_fold"]
    assert oof["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0))
    assert oof["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    per_fold = [f["macro_f1"] for f in report["per_fold"]]
    assert report["summary"]["macro_f1"]["mean"] == pytest.approx(np.mean(per_fold))
    assert "± " in (run / "cv_report.md").read_text()

    # Run again through the CLI: scored folds are kept (not retrained), the report is rewritten.
    stamp = (run / "fold_2" / FOLD_SCORES).stat().st_mtime_ns
    weights = (run / "fold_2" / "best" / "model.safetensors").stat().st_mtime_ns
    (run / "cv_report.json").unlink()
    recipe_file = tmp_path / "recipe.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", "--recipe", str(recipe_file), "--folds", "3"])
    reset_accelerate()
    assert result.exit_code == 0, result.output
    assert "cv_report.md" in result.output
    assert json.loads((run / "cv_report.json").read_text())["out_of_fold"] == oof
    assert (run / "fold_2" / FOLD_SCORES).stat().st_mtime_ns == stamp
    assert (run / "fold_2" / "best" / "model.safetensors").stat().st_mtime_ns == weights

    # A rerun that would mix these fold models with other folds or another recipe is refused, naming why.
    from derm_accel.core.errors import InputError

    with pytest.raises(InputError, match="another fold assignment"):
        train_folds(recipe, 2)
    reset_accelerate()
    with pytest.raises(InputError, match=r"another recipe \(changed: optim\.lr\)"):
        train_folds(recipe, 3, ["optim.lr=0.01"])
    reset_accelerate()
    assert (run / "fold_2" / FOLD_SCORES).stat().st_mtime_ns == stamp
    # Each fold run records its assignment, so deleting fold_data (it looks like a cache) does not unlock a mix.
    import shutil

    from derm_accel.training.kfold import FOLD_ASSIGNMENT

    assert all(json.loads((run / f"fold_{k}" / FOLD_ASSIGNMENT).read_text())["folds"] == 3 for k in (1, 2, 3))
    shutil.rmtree(run / "fold_data")
    with pytest.raises(InputError, match=r"fold_1 was trained on another fold 1 .*--folds was 3, now 2"):
        train_folds(recipe, 2)
    reset_accelerate()
    assert (run / "fold_2" / FOLD_SCORES).stat().st_mtime_ns == stamp


@pytest.mark.distributed
def test_train_folds_under_accelerate_launch_two_ranks(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    data = make_dataset(tmp_path / "data", size=32)
    run = tmp_path / "cv"
    recipe = tiny_recipe(data, run, data={"batch_size": 4}, train={"epochs": 1, "max_steps_per_epoch": 1})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(repo / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", "29523"]
    result = subprocess.run(
        [*launch, "-m", "derm_accel", "train", "--recipe", str(recipe_file), "--folds", "2", "--holdout", "test"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("cross-validation report") == 1  # printed by rank 0 only
    for k in (1, 2):
        info = json.loads((run / f"fold_{k}" / "run_info.json").read_text())
        assert info["accelerate"]["num_processes"] == 2
    with open(run / "oof_predictions.csv") as f:
        sources = [r["source_path"] for r in csv.DictReader(f)]
    assert len(sources) == len(set(sources)) == 63  # gathered once each, padding dropped; the 9 held out apart
    report = json.loads((run / "cv_report.json").read_text())
    assert sorted(f["num_test"] for f in report["per_fold"]) == [31, 32]
    # The held-out split is scored by both ranks together (each member, the ensemble and the soup), once.
    assert report["holdout"]["num_samples"] == 9 and len(report["holdout"]["members"]) == 2
    assert (run / "ensemble.json").is_file()


def test_train_folds_with_a_holdout_compares_members_ensemble_and_soup(tmp_path: Path) -> None:
    from datasets import load_from_disk
    from safetensors.torch import load_file

    from derm_accel.data.selection import load_converted
    from derm_accel.evaluation.inference import score_split
    from derm_accel.models.ensemble import Ensemble, load_models
    from derm_accel.training.kfold import train_folds
    from derm_accel.training.soup import soup_state

    torch.set_num_threads(2)
    data = make_dataset(tmp_path / "data", size=32)
    run = tmp_path / "cv"
    recipe = tiny_recipe(data, run, train={"epochs": 1, "max_steps_per_epoch": 2})
    reset_accelerate()
    train_folds(recipe, 2, holdout="test")
    reset_accelerate()

    held_out = set(load_from_disk(str(data))["test"]["source_path"])
    for k in (1, 2):  # the held-out split is in no fold, neither for training nor for scoring
        fold = load_converted(run / "fold_data" / f"fold_{k}")
        assert not held_out & {p for split in fold.values() for p in split["source_path"]}
    h = json.loads((run / "cv_report.json").read_text())["holdout"]
    assert h["split"] == "test" and h["num_samples"] == len(held_out) == 9
    members = [run / f"fold_{k}" / "best" for k in (1, 2)]
    probs = [score_split(m, data, "test")["probabilities"] for m in members]
    labels = score_split(members[0], data, "test")["labels"]
    ensemble_f1 = f1_score(labels, np.mean(probs, axis=0).argmax(1), average="macro", labels=[0, 1, 2], zero_division=0)
    assert h["ensemble"]["macro_f1"] == pytest.approx(ensemble_f1)
    assert [m["model"] for m in h["members"]] == ["fold_1", "fold_2"]
    assert h["offered"] == (h["soup"]["macro_f1"] >= max(m["macro_f1"] for m in h["members"]))
    assert (run / "soup" / "model.safetensors").is_file() == h["offered"]
    assert "## Held-out split `test`" in (run / "cv_report.md").read_text()

    # The soup is the plain average of the fold weights; the run folder loads as the fold ensemble.
    soup, a, b = soup_state(members), *(load_file(str(m / "model.safetensors")) for m in members)
    key = next(k for k, v in a.items() if v.is_floating_point() and not torch.equal(v, b[k]))
    assert torch.allclose(soup[key], (a[key] + b[key]) / 2)
    net, _ = load_models(str(run))
    assert isinstance(net, Ensemble) and len(net.members) == 2
    from derm_accel.models.ensemble import EnsembleError, check_not_trained_on

    check_not_trained_on(str(run), data, "test")  # the held-out split: allowed
    with pytest.raises(EnsembleError, match="'validation' split was in their training data"):
        check_not_trained_on(str(run), data, "validation")


def test_rows_grouped_with_a_held_out_row_leave_the_folds(tmp_path: Path) -> None:
    from derm_accel.data.folds import pooled_rows, without_holdout

    data = make_dataset(tmp_path / "data", size=32)
    rows = pooled_rows(data)
    paths = list(rows["source_path"])
    from datasets import load_from_disk

    held = set(load_from_disk(str(data))["test"]["source_path"])
    groups = np.arange(len(paths))
    first_held = next(i for i, p in enumerate(paths) if p in held)
    twin = next(i for i, p in enumerate(paths) if p not in held)
    groups[twin] = groups[first_held]  # a copy of a held-out image (or the same patient) in another split
    kept, kept_groups, dropped = without_holdout(rows, groups, data, "test")
    assert dropped == 1 and len(kept) == len(paths) - len(held) - 1 and len(kept_groups) == len(kept)
    assert paths[twin] not in set(kept["source_path"]) and not held & set(kept["source_path"])
