"""evaluate's bootstrap intervals at growing test-split sizes: the per-subgroup table and the headline ones.

Generated predictions (``classes`` classes with skewed frequencies, probabilities that favour the true class,
float32-rounded as a model gives them) and three metadata columns binned as ``evaluate --subgroups
age,sex,site`` bins them (age by decade: ~10 groups; sex: 3 with missing values; site: 15 values). For each
size, the time and peak memory of ``subgroup_rows`` (n, accuracy, balanced accuracy, macro-F1 and macro ROC-AUC
with ``resamples`` percentile-bootstrap resamples per group) and of the headline intervals (derm_metrics'
accuracy and macro-F1), plus the growth exponent fitted over the sizes. With ``reference_sizes``, the
previous implementation (a rankdata per class per resample, kept in tests/test_subgroups.py as the reference
the new one is checked against) is timed at those sizes on the same predictions.

    python benchmarks/subgroups.py --sizes 2000,10000,50000 --reference-sizes 2000
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as `python benchmarks/subgroups.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PeakMemory, as_list, markdown_table, provenance_lines

SITES = [f"site_{i}" for i in range(15)]


def generated(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, list[Any]]]:
    """Labels, probabilities and the age / sex / site columns of ``n`` generated test images."""
    rng = np.random.default_rng(seed)
    freq = rng.dirichlet(np.full(classes, 0.7))
    y = rng.choice(classes, size=n, p=freq)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), y] += rng.normal(1.5, 1.0, n)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32).astype(np.float64)
    age = rng.integers(0, 90, n).astype(float)
    sex = rng.choice(["male", "female", None], size=n, p=[0.48, 0.48, 0.04]).tolist()
    site = rng.choice(SITES, size=n).tolist()
    return y, probs, {"age": age.tolist(), "sex": sex, "site": site}


def _grouped(columns: dict[str, list[Any]]) -> dict[str, Any]:
    from derm_accel.evaluation.subgroups import group_values

    return {name: group_values(name, values) for name, values in columns.items()}


def _timed(fn: Any) -> tuple[float, float]:
    with PeakMemory("cpu") as mem:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, mem.delta_mb


def _reference_rows(grouped: dict[str, Any], y: np.ndarray, probs: np.ndarray, resamples: int) -> None:
    """The subgroup rows with the previous bootstrap (only the bootstrap differs: it dominates the cost)."""
    import derm_accel.evaluation.subgroups as sg
    from tests.test_subgroups import _reference_bootstrap

    current = sg._bootstrap
    sg._bootstrap = _reference_bootstrap
    try:
        sg.subgroup_rows(grouped, y, probs, n_resamples=resamples)
    finally:
        sg._bootstrap = current


def exponent(sizes: list[int], seconds: list[float]) -> float | None:
    """Slope of log(seconds) on log(size): 1 is linear."""
    if len(sizes) < 2:
        return None
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def bench_subgroups(
    *, sizes: Any = "2000,10000,50000", classes: int = 35, resamples: int = 1000, reference_sizes: Any = "2000"
) -> dict[str, Any]:
    """Seconds and peak memory of the subgroup and headline bootstrap intervals at each size (one run)."""
    from derm_accel.evaluation.derm_metrics.derm_metrics import bootstrap_intervals
    from derm_accel.evaluation.subgroups import subgroup_rows

    sizes_list = as_list(sizes, int)
    reference = set(as_list(reference_sizes, int)) if reference_sizes else set()
    rows = []
    for n in sizes_list:
        y, probs, columns = generated(n, classes)
        grouped = _grouped(columns)
        groups = sum(len(order) for _, order, _ in grouped.values())
        sub_s, sub_mb = _timed(lambda: subgroup_rows(grouped, y, probs, n_resamples=resamples))  # noqa: B023
        pred = probs.argmax(1)
        head_s, head_mb = _timed(lambda: bootstrap_intervals(y, pred, classes, resamples))  # noqa: B023
        row = {"images": n, "groups": groups, "subgroups_s": sub_s, "subgroups_peak_mb": sub_mb,
               "headline_s": head_s, "headline_peak_mb": head_mb, "reference_subgroups_s": None}
        if n in reference:
            row["reference_subgroups_s"], _ = _timed(lambda: _reference_rows(grouped, y, probs, resamples))  # noqa: B023
        rows.append(row)
    summary = {
        "subgroups_exponent": exponent(sizes_list, [r["subgroups_s"] for r in rows]),
        "headline_exponent": exponent(sizes_list, [r["headline_s"] for r in rows]),
        "largest_subgroups_s": rows[-1]["subgroups_s"] if rows else None,
    }
    settings = {
        "sizes": ",".join(map(str, sizes_list)), "classes": classes, "resamples": resamples,
        "columns": "age (decade), sex, site (15 values)", "reference_sizes": ",".join(map(str, sorted(reference))),
    }
    return {"settings": settings, "results": {"rows": rows}, "summary": summary}


def subgroups_markdown(results: dict[str, Any]) -> str:
    body = []
    for r in results["results"]["rows"]:
        ref = r["reference_subgroups_s"]
        body.append([f"{r['images']:,}", r["groups"], f"{r['subgroups_s']:.2f}", f"{r['subgroups_peak_mb']:.0f}",
                     "" if ref is None else f"{ref:.1f}", f"{r['headline_s']:.2f}"])
    table = markdown_table(
        ["test images", "groups (3 columns)", "subgroup intervals, s", "peak MB (rise)",
         "previous implementation, s", "headline intervals, s"], body)
    s = results["summary"]
    growth = (f"Fitted growth exponent (log time on log size): subgroups {s['subgroups_exponent']:.2f}, headline "
              f"{s['headline_exponent']:.2f}." if s["subgroups_exponent"] is not None else "")
    return f"{provenance_lines(results)}\n{table}\n\n{growth}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("subgroups"))
