"""Performance across subgroups (skin type, age, sex, body site, site of acquisition...).

For each requested dataset column the test images are grouped (numbers binned: age by decade, Fitzpatrick
type into I-II / III-IV / V-VI, other numbers into quartiles) and each group gets n, accuracy, balanced
accuracy, macro-F1 and macro one-vs-rest ROC-AUC with percentile-bootstrap 95% intervals. Groups under
``SMALL_GROUP`` images are flagged, never hidden; the worst-group gap compares groups of at least that size.
predictions.csv carries each column's value and group, so every number can be recomputed with scikit-learn.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from derm_accel.core.artifacts import fmt
from derm_accel.core.escape import csv_writer, md_code, md_text
from derm_accel.evaluation.cv_stats import macro_f1

SMALL_GROUP = 30
MAX_GROUPS = 50
MISSING = "(missing)"
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
KINDS = ("auto", "decade", "fitzpatrick", "quartile", "value")
FITZPATRICK_BINS = ("I-II", "III-IV", "V-VI")
FILES = {"csv": "subgroups.csv", "plot": "subgroups.png"}
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6}
_CHUNK_ELEMENTS = 2_000_000


def parse_subgroups(spec: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """``"age,fitzpatrick_scale:fitzpatrick"`` -> [("age", "auto"), ("fitzpatrick_scale", "fitzpatrick")]."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else [i for s in spec for i in s.split(",")]
    out = []
    for item in (i.strip() for i in items if i.strip()):
        name, _, kind = item.partition(":")
        kind = kind.strip().lower() or "auto"
        if kind not in KINDS:
            raise ValueError(f"--subgroups {item!r}: binning must be one of {', '.join(KINDS)}.")
        out.append((name.strip(), kind))
    names = [n for n, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    clash = sorted(set(names) & {f"{n}_group" for n in names})
    if twice:
        raise ValueError(f"--subgroups names {twice} more than once.")
    if clash:
        raise ValueError(f"--subgroups {clash} clash with the COL_group columns predictions.csv gets; rename them.")
    return out


# ---- grouping --------------------------------------------------------------------------------------------


def _auto_kind(name: str, numeric: bool, distinct: int) -> str:
    lowered = name.lower()
    if re.search(r"fitz|fits?patrick|skin_?tone|skin_?type|\bfst\b", lowered):
        return "fitzpatrick"
    if numeric and re.search(r"(^|_)age(_|$)", lowered):
        return "decade"
    if numeric and distinct > 10:
        return "quartile"
    return "value"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None  # inf is missing data, as NaN is


def _missing_if_not_finite(value: Any) -> Any:
    """An infinite or NaN number (or its text, "inf") is missing: it belongs to no bin or value group."""
    if value is None or isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(number) else None


def fitzpatrick_bin(value: Any) -> str:
    """1-6 (or I-VI, or DDI's 12/34/56) -> I-II, III-IV or V-VI; anything else is kept as written."""
    number = _number(value)
    if number is None and isinstance(value, str):
        text = re.sub(r"^(type|fst|fitzpatrick)\s*", "", value.strip().lower())
        number = _ROMAN.get(text) or _number(text)
    if number is not None and number in (12, 34, 56):
        return FITZPATRICK_BINS[(int(number) // 10 - 1) // 2]
    if number is not None and number == int(number) and 1 <= number <= 6:
        return FITZPATRICK_BINS[(int(number) - 1) // 2]
    return str(value)


def _format(value: float) -> str:
    return f"{value:g}"


def group_values(name: str, values: Sequence[Any], kind: str = "auto") -> tuple[list[str], list[str], str]:
    """Each row's group label, the groups in display order and the binning used. None (and inf/NaN) ->
    ``MISSING``."""
    values = [_missing_if_not_finite(v) for v in values]
    present = [v for v in values if v is not None]
    numbers = [_number(v) for v in present]
    numeric = bool(present) and all(n is not None for n in numbers)
    if kind == "auto":
        kind = _auto_kind(name, numeric, len(set(present)))
    if kind in ("decade", "quartile") and not numeric:
        raise ValueError(f"--subgroups {name}:{kind} needs a numeric column; {name} holds e.g. {present[:3]}.")
    if kind == "decade":
        labels = [
            MISSING if v is None else f"{int(float(v) // 10 * 10)}-{int(float(v) // 10 * 10) + 9}" for v in values
        ]
        order_key: Any = lambda g: float(g.split("-")[0]) if g[0].isdigit() else math.inf  # noqa: E731
    elif kind == "quartile":
        edges = np.unique(np.quantile(np.asarray(numbers, dtype=float), [0, 0.25, 0.5, 0.75, 1.0]))
        names = [
            f"[{_format(lo)}, {_format(hi)}{']' if i == len(edges) - 2 else ')'}"
            for i, (lo, hi) in enumerate(itertools.pairwise(edges))
        ] or [f"[{_format(edges[0])}]"]

        def label(v: Any) -> str:
            if v is None:
                return MISSING
            i = int(np.searchsorted(edges, float(v), side="right")) - 1
            return names[min(max(i, 0), len(names) - 1)]

        labels = [label(v) for v in values]
        order_key = lambda g: names.index(g) if g in names else math.inf  # noqa: E731
    elif kind == "fitzpatrick":
        labels = [MISSING if v is None else fitzpatrick_bin(v) for v in values]
        order_key = lambda g: (  # noqa: E731
            FITZPATRICK_BINS.index(g)
            if g in FITZPATRICK_BINS
            else (math.inf if g == MISSING else len(FITZPATRICK_BINS))
        )
    else:
        labels = [MISSING if v is None else (str(v).lower() if isinstance(v, bool) else str(v)) for v in values]
        by_number = numeric
        order_key = lambda g: (  # noqa: E731
            (math.inf, "") if g == MISSING else ((float(g), "") if by_number else (0, g))
        )
    order = sorted(set(labels), key=lambda g: (order_key(g), g))
    if len(order) > MAX_GROUPS:
        raise ValueError(
            f"--subgroups {name} has {len(order)} distinct values (e.g. {order[:3]}); at most {MAX_GROUPS} groups "
            "make a readable table. Pick a coarser column, or bin a numeric one with COL:quartile or COL:decade."
        )
    return labels, order, kind


# ---- metrics ---------------------------------------------------------------------------------------------


def _point_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    pred = probs.argmax(axis=1)
    present = np.unique(y)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        balanced = float(balanced_accuracy_score(y, pred))
    return {
        "accuracy": float((y == pred).mean()),
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1(y, pred),
        "roc_auc": float(np.mean(aucs)) if aucs else None,
    }


def _auc_layout(y: np.ndarray, probs: np.ndarray) -> tuple[sparse.csr_matrix, list[tuple[int, int, int]]]:
    """A 0/1 matrix (slots x images) that turns image weights into the sums each class's AUC needs.

    Per class c with positives and negatives (scores ``s = probs[:, c]``, ``u`` the K distinct scores of its
    positives, sorted): K rows sum the weights of the positives scoring ``u_k``, and 2K + 1 rows the weights
    of the negatives in each slot: slot 2k strictly between ``u_{k-1}`` and ``u_k``, slot 2k + 1 tied
    with ``u_k`` (slot 2K above them all). Built once per group by sorting (O(n log n) per class); a resample is
    then one sparse product (O(n) per class) instead of a sort. Also returns (class, first row, K) per class.
    """
    rows, cols, spans = [], [], []
    start = 0
    for c in range(probs.shape[1]):
        positive = y == c
        if not 0 < positive.sum() < len(y):
            continue
        s = probs[:, c]
        u, pos_slot = np.unique(s[positive], return_inverse=True)
        k = len(u)
        neg = np.flatnonzero(~positive)
        below = np.searchsorted(u, s[neg], side="left")
        tied = (below < k) & (u[np.minimum(below, k - 1)] == s[neg])
        rows += [start + pos_slot, start + k + 2 * below + tied]
        cols += [np.flatnonzero(positive), neg]
        spans.append((c, start, k))
        start += 3 * k + 1
    if not spans:
        return sparse.csr_matrix((0, len(y))), []
    r, j = np.concatenate(rows), np.concatenate(cols)
    # float32 sums of whole counts are exact below 2**24 images, and the product is several times faster
    dtype = np.float32 if len(y) < 2**24 else np.float64
    return sparse.csr_matrix((np.ones(len(r), dtype=dtype), (r, j)), shape=(start, len(y))), spans


def _weighted_aucs(sums: np.ndarray, spans: list[tuple[int, int, int]], num_classes: int) -> np.ndarray:
    """(b, C) one-vs-rest AUCs from the layout's sums (slots x b); NaN where a resample lacks a side.

    With weights w (a resample's multiplicities) the AUC of the resample is
    sum_k P_k (N_below(u_k) + N_tied(u_k) / 2) / (sum P * sum N): the Mann-Whitney statistic with ties counted
    half, exactly what ``rankdata`` midranks give on the resampled scores.
    """
    b = sums.shape[1]
    aucs = np.full((b, num_classes), np.nan)
    for c, start, k in spans:
        pos = sums[start : start + k].T  # (b, K)
        neg = sums[start + k : start + 3 * k + 1].T  # (b, 2K + 1)
        below = np.cumsum(neg, axis=1)[:, 0 : 2 * k : 2]  # slots 0..2k: every negative strictly under u_k
        pairs = (pos * (below + 0.5 * neg[:, 1 : 2 * k : 2])).sum(axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        defined = (n_pos > 0) & (n_neg > 0)
        aucs[defined, c] = pairs[defined] / (n_pos[defined] * n_neg[defined])
    return aucs


def _count_layout(y: np.ndarray, pred: np.ndarray, num_classes: int, dtype: type) -> sparse.csr_matrix:
    """0/1 rows (3C x images) summing a weight vector into true, predicted and true-positive counts per class."""
    n = len(y)
    hit = np.flatnonzero(y == pred)
    rows = np.concatenate([y, num_classes + pred, 2 * num_classes + y[hit]])
    cols = np.concatenate([np.arange(n), np.arange(n), hit])
    return sparse.csr_matrix((np.ones(len(rows), dtype=dtype), (rows, cols)), shape=(3 * num_classes, n))


def _bootstrap(y: np.ndarray, probs: np.ndarray, n_resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four metrics on ``n_resamples`` resamples of the group.

    Each resample is drawn as indices (the same stream as ``rng.integers(0, n, (n_resamples, n))``) and used as
    multiplicity weights: one sparse product with the group's layout (class counts, and the scores sorted once
    per class: :func:`_auc_layout`) gives every count and AUC, so the cost is one sort per class for the group
    plus O(n) per class and resample.
    """
    n, num_classes = probs.shape
    pred = probs.argmax(axis=1)
    auc_layout, spans = _auc_layout(y, probs)
    counts = _count_layout(y, pred, num_classes, auc_layout.dtype)
    layout = sparse.vstack([counts, auc_layout], format="csr")
    spans = [(c, 3 * num_classes + start, k) for c, start, k in spans]
    chunk = max(1, _CHUNK_ELEMENTS // n)
    out: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        # weights[j, r]: how often image j is in resample r (images x resamples, as the sparse product wants)
        weights = np.bincount((idx * b + np.arange(b)[:, None]).ravel(), minlength=n * b).reshape(n, b)
        sums = (layout @ weights.astype(layout.dtype)).astype(np.float64)
        true, predicted, tp = (sums[i * num_classes : (i + 1) * num_classes].T for i in range(3))
        present = true > 0
        recall = np.divide(tp, true, out=np.zeros((b, num_classes)), where=present)
        f1 = np.divide(2 * tp, true + predicted, out=np.zeros((b, num_classes)), where=(true + predicted) > 0)
        out["accuracy"].append(tp.sum(axis=1) / n)
        out["balanced_accuracy"].append((recall * present).sum(axis=1) / present.sum(axis=1))
        out["macro_f1"].append((f1 * present).sum(axis=1) / present.sum(axis=1))
        aucs = _weighted_aucs(sums, spans, num_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no defined AUC
            out["roc_auc"].append(np.nanmean(aucs, axis=1))
        done += b
    return {k: np.concatenate(v) for k, v in out.items()}


def _interval(samples: np.ndarray) -> list[float] | None:
    samples = samples[~np.isnan(samples)]
    return [float(v) for v in np.percentile(samples, [2.5, 97.5])] if len(samples) else None


def group_metrics(y: np.ndarray, probs: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """n, the four metrics (None where undefined) and their 95% bootstrap intervals for one group."""
    row: dict[str, Any] = {"n": len(y), **_point_metrics(y, probs)}
    boot = _bootstrap(y, probs, n_resamples, np.random.default_rng(seed)) if n_resamples else {}
    for metric in METRICS:
        ci = _interval(boot[metric]) if metric in boot and row[metric] is not None else None
        row[f"{metric}_ci"] = ci
    return row


def worst_group_gaps(rows: Sequence[Mapping[str, Any]], min_n: int = SMALL_GROUP) -> dict[str, Any]:
    """Per column: best minus worst accuracy and balanced accuracy over groups of >= ``min_n`` known values."""
    gaps: dict[str, Any] = {}
    for column in dict.fromkeys(r["column"] for r in rows):
        eligible = [r for r in rows if r["column"] == column and r["n"] >= min_n and r["value"] != MISSING]
        entry: dict[str, Any] = {"groups_compared": len(eligible), "min_group_size": min_n}
        for metric in ("accuracy", "balanced_accuracy"):
            if len(eligible) < 2:
                entry[metric] = None
                continue
            worst = min(eligible, key=lambda r: r[metric])
            best = max(eligible, key=lambda r: r[metric])
            entry[metric] = {
                "worst_group": worst["value"],
                "worst": worst[metric],
                "best_group": best["value"],
                "best": best[metric],
                "gap": best[metric] - worst[metric],
            }
        if len(eligible) < 2:
            entry["note"] = f"fewer than two groups with at least {min_n} images and a known value"
        gaps[column] = entry
    return gaps


def subgroup_rows(
    columns: Mapping[str, tuple[list[str], list[str], str]],
    y: np.ndarray,
    probs: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    min_n: int = SMALL_GROUP,
) -> list[dict[str, Any]]:
    """One row per (column, group): the metrics of the images in that group."""
    rows = []
    for c, (name, (labels, order, kind)) in enumerate(columns.items()):
        labels_array = np.asarray(labels, dtype=object)
        for g, value in enumerate(order):
            mask = labels_array == value
            metrics = group_metrics(y[mask], probs[mask], n_resamples=n_resamples, seed=seed + 7919 * c + g)
            rows.append({"column": name, "binning": kind, "value": value, "small": metrics["n"] < min_n, **metrics})
    return rows


# ---- dataset columns -------------------------------------------------------------------------------------


def column_values(split: Any, name: str) -> list[Any]:
    """A column of a datasets split as Python values; ClassLabel indices become their names."""
    from datasets import ClassLabel

    if name not in split.column_names:
        extra = [c for c in split.column_names if c not in {"image", "label", "content_hash", "phash"}]
        raise ValueError(
            f"--subgroups column {name!r} is not in the dataset; its columns are {extra}. Convert with --metadata to "
            "carry the table's columns."
        )
    values = split[name]
    feature = split.features[name]
    if isinstance(feature, ClassLabel):
        return [None if v is None or v < 0 else feature.int2str(int(v)) for v in values]
    return list(values)


def check_columns(split: Any, spec: Sequence[tuple[str, str]]) -> None:
    """Fail before inference when a requested column is missing or cannot be grouped."""
    for name, kind in spec:
        group_values(name, column_values(split, name), kind)


def prediction_columns(columns: Mapping[str, tuple[list[str], list[str], str]], raw: Mapping[str, list[Any]]) -> dict:
    """What predictions.csv carries: each column's value (empty when null) and its group."""
    out: dict[str, list[Any]] = {}
    for name, (labels, _, _) in columns.items():
        out[name] = ["" if v is None else v for v in raw[name]]
        out[f"{name}_group"] = labels
    return out


def evaluate_subgroups(
    split: Any,
    spec: Sequence[tuple[str, str]],
    y: np.ndarray,
    probs: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    min_n: int = SMALL_GROUP,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The ``subgroups`` block of metrics.json and the columns predictions.csv gains."""
    raw = {name: column_values(split, name) for name, _ in spec}
    grouped = {name: group_values(name, raw[name], kind) for name, kind in spec}
    rows = subgroup_rows(grouped, y, probs, n_resamples=n_resamples, seed=seed, min_n=min_n)
    summary = {
        "columns": {name: kind for name, (_, _, kind) in grouped.items()},
        "min_group_size": min_n,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "interval": "percentile 95%"},
        "rows": rows,
        "worst_group_gap": worst_group_gaps(rows, min_n),
        "files": dict(FILES),
    }
    return summary, prediction_columns(grouped, raw)


# ---- outputs ---------------------------------------------------------------------------------------------


def csv_header() -> list[str]:
    return [
        "column",
        "binning",
        "value",
        "n",
        "small_group",
        *[f"{m}{s}" for m in METRICS for s in ("", "_ci_low", "_ci_high")],
    ]


def write_subgroups_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """subgroups.csv: one row per group; empty cells where a metric is undefined."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv_writer(f)
        writer.writerow(csv_header())
        for r in rows:
            cells: list[Any] = [r["column"], r["binning"], r["value"], r["n"], "yes" if r["small"] else ""]
            for metric in METRICS:
                ci = r[f"{metric}_ci"] or ["", ""]
                cells += ["" if r[metric] is None else f"{r[metric]:.6g}", *(v if v == "" else f"{v:.6g}" for v in ci)]
            writer.writerow(cells)
    return path


def write_subgroup_outputs(block: Mapping[str, Any], out_dir: str | Path) -> None:
    """subgroups.csv and subgroups.png in the report folder."""
    write_subgroups_csv(block["rows"], Path(out_dir) / FILES["csv"])
    plot_subgroups(block["rows"], Path(out_dir) / FILES["plot"])


def plot_subgroups(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One panel per column: accuracy and balanced accuracy per group with 95% intervals; small groups grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = list(dict.fromkeys(r["column"] for r in rows))
    heights = [max(1.5, 0.45 * sum(r["column"] == c for r in rows) + 0.8) for c in columns]
    fig = Figure(figsize=(7.5, sum(heights)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(columns), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, column in zip(axes, columns, strict=True):
        group = [r for r in rows if r["column"] == column]
        ypos = np.arange(len(group))[::-1]
        for offset, metric, marker in ((0.12, "accuracy", "o"), (-0.12, "balanced_accuracy", "s")):
            for yv, r in zip(ypos, group, strict=True):
                ci = r[f"{metric}_ci"]
                colour = "0.6" if r["small"] else ("C0" if metric == "accuracy" else "C1")
                err = None if ci is None else [[r[metric] - ci[0]], [ci[1] - r[metric]]]
                ax.errorbar(r[metric], yv + offset, xerr=err, fmt=marker, color=colour, capsize=3, ms=5)
        ax.set_yticks(ypos, [f"{r['value']} (n={r['n']}{', small' if r['small'] else ''})" for r in group])
        ax.set_xlim(0, 1.02)
        ax.set_title(column, loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("circles: accuracy, squares: balanced accuracy (95% CI); grey: small group")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110, bbox_inches="tight")
    return Path(path)


def _with_ci(row: Mapping[str, Any], metric: str) -> str:
    ci = row[f"{metric}_ci"]
    return fmt(row[metric]) + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def table_lines(block: Mapping[str, Any]) -> list[str]:
    """The subgroup table and worst-group gaps as Markdown (report.md and the model card)."""
    lines = [
        "| column | group | n | accuracy (95% CI) | balanced accuracy | macro-F1 | ROC-AUC (macro) |",
        "|---|---|---:|---|---|---|---|",
    ]
    for r in block["rows"]:
        flag = " ⚠" if r["small"] else ""
        lines.append(
            f"| {md_text(r['column'])} | {md_text(r['value'])}{flag} | {r['n']} | {_with_ci(r, 'accuracy')} | "
            f"{_with_ci(r, 'balanced_accuracy')} | {_with_ci(r, 'macro_f1')} | {_with_ci(r, 'roc_auc')} |"
        )
    lines += ["", f"⚠ fewer than {block['min_group_size']} images: too few for a firm conclusion.", ""]
    for column, gap in block["worst_group_gap"].items():
        acc = gap.get("accuracy")
        if acc:
            lines.append(
                f"- **{md_text(column)}**: worst group {md_text(acc['worst_group'])} (accuracy {acc['worst']:.3f}) "
                f"vs best "
                f"{md_text(acc['best_group'])} ({acc['best']:.3f}): gap **{acc['gap']:.3f}**"
                + (
                    f"; balanced-accuracy gap {gap['balanced_accuracy']['gap']:.3f}"
                    if gap.get("balanced_accuracy")
                    else ""
                )
                + f" ({gap['groups_compared']} groups of at least {gap['min_group_size']} images)."
            )
        else:
            lines.append(f"- **{md_text(column)}**: no worst-group gap: {gap['note']}.")
    return lines


def report_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The report.md section (empty without --subgroups)."""
    block = metrics.get("subgroups")
    if not block:
        return []
    kinds = ", ".join(f"{md_code(c)} ({k})" for c, k in block["columns"].items())
    return [
        "## Performance across subgroups",
        "",
        f"Images grouped by {kinds}; numbers are binned (age by decade, Fitzpatrick type into I-II / III-IV / "
        "V-VI, other numbers into quartiles); empty cells form the group `(missing)`. Intervals: percentile "
        f"bootstrap within each group, {block['bootstrap']['resamples']} resamples. ROC-AUC is the mean "
        "one-vs-rest AUC over the classes present in the group (n/a with a single class).",
        "",
        *table_lines(block),
        "",
        f"![Subgroups]({block['files']['plot']})",
        "",
        f"Table: `{block['files']['csv']}`; `predictions.csv` holds each image's value and group, so every "
        "number here can be recomputed.",
        "",
    ]


def model_card_section(metrics: Mapping[str, Any], report_files: set[str]) -> str | None:
    """ "Performance across subgroups" for the model card, or None when the report has no subgroups."""
    block = metrics.get("subgroups") if metrics else None
    if not block:
        return None
    lines = [
        "## Performance across subgroups",
        "",
        f"On the **{metrics.get('split', 'test')}** split, by {', '.join(md_code(c) for c in block['columns'])} "
        "(95% bootstrap intervals). Small groups are flagged, not hidden; a model that does well on average can "
        "still fail one group.",
        "",
        *table_lines(block),
    ]
    if block["files"]["plot"] in report_files:
        lines += ["", f"![Subgroups](eval/{block['files']['plot']})"]
    if block["files"]["csv"] in report_files:
        lines += ["", f"Full table: [`eval/{block['files']['csv']}`](eval/{block['files']['csv']})."]
    return "\n".join(lines)
