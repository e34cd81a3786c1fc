"""k-fold training as one run: ``derm-accel train --recipe R --folds K``.

``RUN/fold_data/fold_k`` holds each fold's dataset (:mod:`derm_accel.data.folds`: the held-out fold is its
``test`` split; an index selection of ``data.path``, no image copied), ``RUN/fold_k`` is a normal run on it
(with ``best/``), ``RUN/oof_predictions.csv`` the out-of-fold probabilities of every image (each scored by the
one model that never saw it), and ``RUN/cv_report.json`` / ``cv_report.md`` the metrics per fold, their
mean ± sd with a t-interval, and the pooled out-of-fold metrics. A fold already scored is kept when the command
runs again; one interrupted mid-training is resumed from its latest checkpoint. Under ``accelerate launch``
every process runs every fold (train() shards the batches); files are written by the main process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from derm_accel.core.artifacts import FOLD_DATA
from derm_accel.core.distributed import use_cpu_ranks_without_gpu
from derm_accel.core.errors import InputError
from derm_accel.core.fileio import atomic_write_json, atomic_write_text
from derm_accel.data.folds import column, make_fold_datasets
from derm_accel.data.selection import load_converted
from derm_accel.evaluation.cv_stats import classification_metrics, mean_sd_ci
from derm_accel.evaluation.inference import score_split
from derm_accel.evaluation.report import write_predictions_csv
from derm_accel.guard.fit import fit_model_guard
from derm_accel.models.ensemble import write_ensemble
from derm_accel.training.checkpoints import list_checkpoints
from derm_accel.training.config import Recipe, load_recipe
from derm_accel.training.soup import compare_on_split, write_soup
from derm_accel.training.train import train

OOF_FILE = "oof_predictions.csv"
REPORT_JSON = "cv_report.json"
REPORT_MD = "cv_report.md"
FOLD_SCORES = "fold_scores.json"  # in RUN/fold_k once its held-out fold is scored
SOUP_DIR = "soup"
CV_RECIPE = "cv_recipe.json"  # the recipe the fold runs were trained with (a rerun must match it)
FOLD_ASSIGNMENT = "fold_assignment.json"  # in RUN/fold_k: which images the fold trained on and held out, hashed
METRICS = ("macro_f1", "balanced_accuracy", "accuracy")


def fold_overrides(fold_data: Path, fold_run: Path) -> list[str]:
    return [
        f"data.path={fold_data}",
        "data.train_split=train",
        "data.val_split=validation",
        f"output_dir={fold_run}",
    ]


@contextlib.contextmanager
def _process_group_kept() -> Iterator[Any]:
    """The process group's state, kept alive across folds, then destroyed.

    Each train() ends with ``Accelerator.end_training()``, which destroys the process group. accelerate skips
    that for a fork-launched group, a flag every ``PartialState()`` re-reads from ``FORK_LAUNCHED``; so that
    variable is set while the folds run.
    """
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env

    before = os.environ.get("FORK_LAUNCHED")
    os.environ["FORK_LAUNCHED"] = "1"
    try:
        yield PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # read as AcceleratorState reads it
    finally:
        if before is None:
            os.environ.pop("FORK_LAUNCHED", None)
        else:
            os.environ["FORK_LAUNCHED"] = before
    state = PartialState()  # re-reads the flag
    state.destroy_process_group()


def _train_fold(recipe: Recipe, fold_data: Path, fold_run: Path) -> None:
    resume = "latest" if list_checkpoints(fold_run) else None
    train(recipe, fold_overrides(fold_data, fold_run), resume=resume)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fold_assignment(recipe: Recipe, fold_data: Path, k: int, folds: int) -> dict[str, Any]:
    """What fold ``k`` trains on and holds out: a hash of its splits' images and one of the recipe."""
    dataset = load_converted(fold_data)  # an index selection of data.path (or a copy written by an earlier version)
    members = {
        split: sorted(zip(column(dataset[split], "source_path"), column(dataset[split], "content_hash"), strict=True))
        for split in sorted(dataset)
    }
    return {
        "fold": k,
        "folds": folds,
        "membership": _digest(members),
        "recipe": _digest(recipe.to_dict()),
        "images": {split: len(rows) for split, rows in members.items()},
    }


def check_fold_runs(run_dir: Path, data_root: Path, recipe: Recipe, folds: int, *, adopt: bool) -> None:
    """Refuse to keep a fold run trained on another assignment than this run's fold of the same number (its
    model may have trained on the images the new fold holds out); record the assignment of every fold run.

    ``adopt``: fold runs written before assignments were recorded are taken as they are, because the fold
    manifest they were cut with is unchanged (make_fold_datasets refuses otherwise)."""
    for k in range(1, folds + 1):
        fold_run = run_dir / f"fold_{k}"
        path = fold_run / FOLD_ASSIGNMENT
        if not fold_run.is_dir():
            continue  # trained later, recorded by _fold before its first step
        wanted = fold_assignment(recipe, data_root / f"fold_{k}", k, folds)
        start_over = (
            f"Start over with a new output_dir (--set output_dir=runs/NEW), or delete {run_dir}/fold_* (the fold "
            f"runs) and {run_dir / FOLD_DATA} to train every fold again."
        )
        if not path.is_file():
            if not adopt:
                raise InputError(
                    f"{fold_run} records no {FOLD_ASSIGNMENT} and {run_dir / FOLD_DATA / 'folds.json'} was gone, "
                    f"so nothing tells which images its model trained on: fold {k} of this run may hold out images "
                    f"it learnt from. {start_over}"
                )
        else:
            before = json.loads(path.read_text())
            changed = [key for key in ("folds", "membership", "recipe") if before.get(key) != wanted[key]]
            if changed:
                what = {
                    "folds": f"--folds was {before.get('folds')}, now {folds}",
                    "membership": "its images differ (the data, --folds, the seed, --group-column or --holdout "
                    f"changed, or {FOLD_DATA} was rebuilt another way): trained on "
                    f"{before.get('images', {}).get('train')} images, this fold's train split holds "
                    f"{wanted['images'].get('train')}",
                    "recipe": "the recipe changed",
                }
                raise InputError(
                    f"{fold_run} was trained on another fold {k} than this run's ({path}: "
                    f"{'; '.join(what[c] for c in changed)}); its model may have seen the images this fold holds "
                    f"out, so its scores would be optimistic. {start_over}"
                )
        atomic_write_json(path, wanted)


def _fold(
    recipe: Recipe, data_root: Path, run_dir: Path, k: int, folds: int, tta: str | None, main: bool
) -> dict[str, Any]:
    """Train fold ``k`` unless it was scored before; score its held-out images (on every process)."""
    from accelerate.state import PartialState

    fold_data, fold_run = data_root / f"fold_{k}", run_dir / f"fold_{k}"
    done = fold_run / FOLD_SCORES
    if main and not (fold_run / FOLD_ASSIGNMENT).is_file():  # recorded before its first step
        fold_run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(fold_run / FOLD_ASSIGNMENT, fold_assignment(recipe, fold_data, k, folds))
    if not done.is_file():
        _train_fold(recipe, fold_data, fold_run)
    scores = score_split(fold_run / "best", fold_data, "test", tta=tta)  # the held-out fold
    scores["fold"] = k
    if main and not done.is_file():
        metrics = classification_metrics(scores["labels"], scores["probabilities"].argmax(1))
        done.write_text(json.dumps({"fold": k, "tta": tta, **metrics}, indent=2) + "\n")
    PartialState().wait_for_everyone()
    return scores


def train_folds(
    recipe: str | Path | Recipe | dict,
    folds: int,
    overrides: list[str] | None = None,
    *,
    seed: int = 0,
    group_column: str | None = None,
    tta: str | None = None,
    holdout: str | None = None,
) -> Path:
    """Train the recipe on each of ``folds`` folds of its dataset (all splits pooled); return RUN.

    ``holdout`` (e.g. "test") keeps that split out of every fold: the fold models, their ensemble and their
    weight average (:mod:`derm_accel.training.soup`) are then compared on it, and ``RUN/soup`` is kept where the soup
    does not lose to the best fold model. ``RUN/ensemble.json`` (the fold models as one ensemble) is written
    last, when every fold is scored.
    """
    recipe = load_recipe(recipe, overrides)
    tta = tta or recipe.model.tta  # folds are scored the way the exported models answer
    run_dir = Path(recipe.output_dir)
    use_cpu_ranks_without_gpu()
    with _process_group_kept() as state:
        data_root = run_dir / FOLD_DATA
        if state.is_main_process:
            trained = sorted(p for p in run_dir.glob("fold_[0-9]*") if p.is_dir())
            check_same_recipe(run_dir, recipe, trained)
            manifest_kept = (data_root / "folds.json").is_file()
            make_fold_datasets(
                recipe.data.path, data_root, folds, seed=seed, group_column=group_column, trained=trained,
                holdout=holdout,
            )
            check_fold_runs(run_dir, data_root, recipe, folds, adopt=manifest_kept)
        state.wait_for_everyone()
        scored = [_fold(recipe, data_root, run_dir, k, folds, tta, state.is_main_process) for k in range(1, folds + 1)]
        main = state.is_main_process
        report = write_cv_outputs(run_dir, scored, recipe, folds=folds, seed=seed, tta=tta) if main else {}
        if holdout:  # scored on every process (inference shards the rows); written by the main one
            report["holdout"] = holdout_comparison(run_dir, recipe, folds, holdout, tta, state)
        if state.is_main_process:
            write_report(run_dir, report)
            write_ensemble(
                run_dir, [f"fold_{k}/best" for k in range(1, folds + 1)], note=f"the {folds} fold models of {run_dir}"
            )
        state.wait_for_everyone()
    return run_dir


def holdout_comparison(
    run_dir: Path, recipe: Recipe, folds: int, holdout: str, tta: str | None, state: Any
) -> dict[str, Any]:
    """Fold models, their ensemble and their soup on the held-out split; RUN/soup kept only if it does not lose."""
    import shutil

    members = [run_dir / f"fold_{k}" / "best" for k in range(1, folds + 1)]
    soup_dir, candidate = run_dir / SOUP_DIR, run_dir / f".{SOUP_DIR}-candidate"
    if state.is_main_process:
        shutil.rmtree(candidate, ignore_errors=True)
        write_soup(members, candidate)
    state.wait_for_everyone()
    result = compare_on_split(members, candidate, recipe.data.path, holdout, tta=tta)
    state.wait_for_everyone()  # every process has read the candidate before it is moved or removed
    result["members"] = [{**m, "model": f"fold_{k}"} for k, m in enumerate(result["members"], start=1)]
    if not state.is_main_process:
        return result
    shutil.rmtree(soup_dir, ignore_errors=True)
    if result["offered"]:
        if recipe.guard.enabled:  # the guard of the soup's own features, fitted as train fits one

            g = recipe.guard
            d = recipe.data
            fit_model_guard(
                candidate, d.path, train_split=d.train_split, val_split=d.val_split,
                in_domain_share=g.in_domain_share, target_error=g.target_error,
                target_coverage=g.target_coverage, max_fit_images=g.max_fit_images, seed=recipe.train.seed,
            )
        candidate.rename(soup_dir)
        result["soup_dir"] = SOUP_DIR
    else:
        shutil.rmtree(candidate)
    return result


def check_same_recipe(run_dir: Path, recipe: Recipe, trained: list[Path]) -> None:
    """Refuse to mix fold models of another recipe into this cross-validation; record the recipe otherwise."""
    path = run_dir / CV_RECIPE
    wanted = recipe.to_dict()
    if trained and path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in _flat_keys(before) | _flat_keys(wanted) if _get(before, k) != _get(wanted, k))
        if changed:
            raise InputError(
                f"{run_dir} holds fold runs of another recipe (changed: {', '.join(changed)}); their scores would "
                f"be mixed with this one's. Use a new output_dir (--set output_dir=runs/NEW)."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, wanted)


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in tree.items():
        keys |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def cv_report(scored: list[dict[str, Any]], *, folds: int, seed: int, tta: str | None) -> dict[str, Any]:
    """Per-fold metrics, their mean/sd/t-interval, and the metrics of the pooled out-of-fold predictions."""
    per_fold = []
    for s in scored:
        metrics = classification_metrics(s["labels"], s["probabilities"].argmax(1))
        per_fold.append({"fold": s["fold"], "num_test": len(s["labels"]), **metrics})
    labels = np.concatenate([s["labels"] for s in scored])
    probs = np.concatenate([s["probabilities"] for s in scored])
    return {
        "folds": folds,
        "seed": seed,
        "tta": tta,
        "label_names": scored[0]["label_names"],
        "per_fold": per_fold,
        "summary": {m: mean_sd_ci([f[m] for f in per_fold]) for m in METRICS},
        "out_of_fold": {"num_samples": len(labels), **classification_metrics(labels, probs.argmax(1))},
    }


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['folds']}-fold cross-validation",
        "",
        "Folds: stratified by class, duplicate groups kept in one fold (derm_accel.cv); each fold's model is",
        "scored on the fold it never saw. Interval: 95% t-interval of the mean over folds.",
        "",
        "| metric | mean ± sd | 95% interval | out-of-fold (pooled) |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        s = report["summary"][m]
        lines.append(
            f"| {m} | {s['mean']:.3f} ± {s['sd']:.3f} | [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
            f"{report['out_of_fold'][m]:.3f} |"
        )
    lines += ["", "| fold | test images | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for f in report["per_fold"]:
        lines.append(f"| {f['fold']} | {f['num_test']} | " + " | ".join(f"{f[m]:.3f}" for m in METRICS) + " |")
    if report.get("holdout"):
        lines += holdout_lines(report["holdout"])
    return "\n".join(lines) + "\n"


def holdout_lines(h: dict[str, Any]) -> list[str]:
    """The held-out split: each fold model, their ensemble (RUN/ensemble.json) and their soup."""
    rows = [(m["model"], m) for m in h["members"]] + [("ensemble (mean probability)", h["ensemble"])]
    rows.append(("soup (weight average)", h["soup"]))
    verdict = (
        f"kept as `{h['soup_dir']}` (one model, a single model's inference cost)"
        if h["offered"]
        else f"not kept: its macro-F1 is below the best fold model's ({h['best_member_macro_f1']:.3f})"
    )
    lines = [
        "",
        f"## Held-out split `{h['split']}` ({h['num_samples']} images no fold model trained on)",
        "",
        "| model | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |" for name, m in rows]
    return [*lines, "", f"The soup is {verdict}."]


def write_cv_outputs(
    run_dir: Path, scored: list[dict[str, Any]], recipe: Recipe, *, folds: int, seed: int, tta: str | None
) -> dict[str, Any]:
    names = scored[0]["label_names"]
    write_predictions_csv(
        run_dir / OOF_FILE,
        [p for s in scored for p in s["source_paths"]],
        np.concatenate([s["labels"] for s in scored]),
        np.concatenate([s["probabilities"] for s in scored]),
        names,
        extra={"fold": [s["fold"] for s in scored for _ in s["labels"]]},
    )
    report = cv_report(scored, folds=folds, seed=seed, tta=tta)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    return report


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    atomic_write_json(run_dir / REPORT_JSON, report)
    atomic_write_text(run_dir / REPORT_MD, render_markdown(report))
