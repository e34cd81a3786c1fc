"""The recipe benchmark's summary: per-fold results -> mean ± sd and the paired difference to plain."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from benchmarks.recipes import CANDIDATES, markdown, recipe_dict, summarize


def _fold(row: str, f1: float) -> dict:
    return {row: {"macro_f1": f1, "balanced_accuracy": f1 + 0.01, "accuracy": f1 + 0.02}, "fold": 0}


def test_summary_pairs_folds_against_plain() -> None:
    plain, qs = [0.48, 0.52, 0.45], [0.55, 0.56, 0.53]
    summary = summarize(
        {"plain": [_fold("plain", v) for v in plain], "quickstart": [_fold("quickstart", v) for v in qs]}
    )
    diffs = np.subtract(qs, plain)
    vs = summary["quickstart"]["vs_plain"]["macro_f1"]
    assert vs["mean"] == pytest.approx(diffs.mean())
    low, high = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (vs["ci_low"], vs["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert summary["quickstart"]["accuracy"]["mean"] == pytest.approx(np.mean(qs) + 0.02)
    assert "vs_plain" not in summary["plain"]
    table = markdown(summary, 3, 5)
    assert f"| quickstart | 3 of 5 | {np.mean(qs):.3f} ± {np.std(qs, ddof=1):.3f}" in table
    assert f"{diffs.mean():+.3f} [{low:+.3f}, {high:+.3f}]" in table


def test_candidates_are_valid_recipes(tmp_path) -> None:
    import argparse

    from derm_accel.training.config import parse_override

    args = argparse.Namespace(
        model="tf_efficientnet_lite0", pretrained_file=str(tmp_path), epochs=4, batch_size=32, set=None
    )
    base = recipe_dict("quickstart", tmp_path / "d", tmp_path / "r", args)
    assert base["data"]["batch_size"] == 32 and base["train"]["epochs"] == 4
    for name, overrides in CANDIDATES.items():
        resolved = recipe_dict(name, tmp_path / "d", tmp_path / "r", args)  # load_recipe validates every key
        for item in overrides:
            key, value = parse_override(item)
            node = resolved
            for part in key.split("."):
                node = node[part]
            if isinstance(node, float):
                value = float(value)  # YAML 1.1 reads 5e-4 as a string; the recipe coerces it
            assert node == pytest.approx(value) if isinstance(node, (int, float, list)) else node == value, key


def test_target_rows_count_foreign_predictions_as_errors_and_pair_with_the_reference() -> None:
    from benchmarks.recipes import cross_metrics

    labels = ["melanoma", "nevus", "psoriasis", "vascular"]
    y = np.array([0, 0, 1, 1, 1, 1])  # only melanoma and nevus are present in the other collection
    p = np.array([0, 3, 1, 1, 3, 3])  # "vascular" is never right there
    m = cross_metrics(y, p, labels)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["recall"] == {"melanoma": 0.5, "nevus": 0.5} and m["num_images"] == 6
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)  # F1 of the two present classes only

    def fold(name: str, ba: float) -> dict:
        row = {"macro_f1": ba, "balanced_accuracy": ba, "accuracy": ba}
        return {name: row, f"{name}@target": row}

    per_fold = {
        "quickstart": [fold("quickstart", 0.2), fold("quickstart", 0.3)],
        "shades_of_gray": [fold("shades_of_gray", 0.3), fold("shades_of_gray", 0.5)],
    }
    summary = summarize(per_fold)
    vs = summary["shades_of_gray@target"]["vs_reference"]["balanced_accuracy"]
    assert vs["mean"] == pytest.approx(0.15) and vs["n"] == 2
    assert "vs_reference" not in summary["quickstart@target"] and "vs_plain" not in summary["shades_of_gray@target"]
    table = markdown(summary, 2, 5)
    assert "| shades_of_gray@target | 2 of 5 | 0.400 ± 0.141 | 0.400 ± 0.141 | +0.150" in table
