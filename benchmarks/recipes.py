"""Recipe benchmark: k-fold cross-validation of fine-tuning recipes against a plain timm loop.

    python benchmarks/recipes.py --data DATA --pretrained-file WEIGHTS --recipes plain,quickstart --folds 5

DATA is a converted dataset (``derm-accel convert``); all its splits are pooled and cut into stratified folds
that keep every duplicate group (and patient, ``--group-column``) in one fold (derm_accel.cv). Every recipe
trains on every fold for the same epochs and batch size, on the same images (the other folds minus a grouped
tenth kept for picking the best epoch), and is scored on the held-out fold. Results: macro-F1, balanced
accuracy and accuracy as mean ± sd over folds, and the paired per-fold difference to ``plain`` with its
t-interval. ``--fold-limit 3`` runs only the first 3 folds of the same K-fold split (quick ablations); per-fold
results are cached under ``--work`` by recipe content, so a later full run reuses them.

``plain`` is the honest floor, written here in plain PyTorch: a timm model on ImageNet weights, AdamW at a
constant learning rate, RandomResizedCrop + horizontal flip, cross-entropy, nothing else; the weights after
the last epoch are scored. Every other recipe is the quickstart's fine-tune recipe (derm_accel.quickstart)
plus ``--set``-style overrides, trained by derm_accel's own ``train()`` and scored from ``RUN/best`` (picked on
the inner validation split, as the quickstart does); ``NAME+tta`` rows score the same model with flip TTA.

Across collections: ``--target OTHER`` (another converted collection) scores every fold model also on all of
OTHER's images whose class maps onto one of the model's (``--target-label-map``, as ``evaluate --label-map``):
rows ``NAME@target`` / ``NAME+tta@target`` with balanced accuracy and macro-F1 over the classes present
(predicting a class OTHER lacks is an error), paired fold by fold with ``--reference`` (default quickstart).
Train on collection A and score on B with ``--data A --target B``; the other direction swaps them; on a
collection with lesion or patient ids, ``--group-column lesion_id`` keeps a lesion's images in one fold
(leave it out to see what an image-level split overstates).

    python benchmarks/recipes.py --data data/derm160 --target data/ham-dev --target-label-map ham_to_derm.yaml \
        --recipes quickstart,shades_of_gray --folds 5 --fold-limit 3 --pretrained-file WEIGHTS
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from derm_accel.data.folds import make_fold_datasets
from derm_accel.data.selection import load_converted
from derm_accel.evaluation.cv_stats import classification_metrics, mean_sd_ci, paired_difference

BASELINE = "plain"
TARGET = "@target"  # suffix of the rows that score a fold model on the other collection (--target)
METRICS = ("macro_f1", "balanced_accuracy", "accuracy")
# Candidates: overrides on the quickstart's fine-tune recipe, tried one at a time against "quickstart".
CANDIDATES: dict[str, list[str]] = {
    "quickstart": [],
    "lr_5e-4": ["optim.lr=5e-4"],
    "lr_2e-3": ["optim.lr=2e-3"],
    "no_smoothing": ["optim.label_smoothing=0"],
    "warmup_1": ["optim.warmup_epochs=1"],
    "balanced_sampler": ["data.balance=sampler"],
    "weighted_loss": ["data.balance=weighted_loss"],
    "ema": ["optim.ema=true", "optim.ema_decay=0.9"],
    "crop_0.08": ["data.augment.scale=[0.08, 1.0]"],
    "res_288": ["data.image_size=288"],
    "batch_16": ["data.batch_size=16"],
    "layer_decay_0.8_lr_3e-3": ["optim.layer_decay=0.8", "optim.lr=3e-3"],
    "trivialaugment": ["data.augment.auto_augment=trivialaugment"],
    "mixup_0.2": ["data.augment.mixup=0.2"],
    "mixup_cutmix": ["data.augment.mixup=0.8", "data.augment.cutmix=1.0"],
    # across collections (docs/recipes.md, "Across collections")
    "shades_of_gray": ["data.color_constancy=shades_of_gray", "data.color_constancy_power=6"],
    "color_jitter_0.4": ["data.augment.color_jitter=0.4"],
    "shades_of_gray_jitter_0.4": ["data.color_constancy=shades_of_gray", "data.augment.color_jitter=0.4"],
}


# ----------------------------------------------------------------------------------------------- plain
def plain_fold(fold_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The plain loop: timm model, AdamW, RandomResizedCrop + flip, cross-entropy; last-epoch weights scored."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    torch.manual_seed(args.seed)
    data = load_converted(fold_dir)  # an index selection of the dataset (data/selection.py)
    num_classes = data["train"].features["label"].num_classes
    weights = Path(args.pretrained_file) / "model.safetensors"
    model = timm.create_model(
        args.model, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(weights)}
    )
    cfg = resolve_data_config(model=model)
    size = cfg["input_size"][-1]
    train_tf = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    )
    eval_tf = create_transform(**cfg)

    def loader(split: str, tf: Any, shuffle: bool) -> torch.utils.data.DataLoader:
        ds = data[split].with_transform(
            lambda b: {"x": [tf(im.convert("RGB")) for im in b["image"]], "y": b["label"]}, columns=["image", "label"]
        )
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, drop_last=shuffle)

    opt = torch.optim.AdamW(model.parameters(), lr=args.plain_lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(args.epochs):
        model.train()
        for batch in loader("train", train_tf, True):
            loss = loss_fn(model(batch["x"]), torch.as_tensor(batch["y"]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in loader("test", eval_tf, False):
            preds.append(model(batch["x"]).argmax(-1))
            labels.append(torch.as_tensor(batch["y"]))
    y, p = torch.cat(labels).numpy(), torch.cat(preds).numpy()
    return {BASELINE: classification_metrics(y, p), "num_test": len(y), "num_train": len(data["train"])}


# ------------------------------------------------------------------------------------ derm-accel recipes
def recipe_dict(name: str, fold_dir: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from derm_accel.quickstart import _recipe
    from derm_accel.training.config import load_recipe

    base = _recipe(fold_dir, run_dir, args.model, Path(args.pretrained_file), args.epochs, "other")
    base["data"]["batch_size"] = args.batch_size
    base["model"].pop("tta", None)  # the benchmark scores every model both ways itself (NAME and NAME+tta)
    return load_recipe(base, CANDIDATES[name] + list(args.set or [])).to_dict()


def recipe_fold(name: str, fold_dir: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train with derm_accel.train on the fold, score RUN/best on the held-out fold (and with flip TTA)."""
    from accelerate import Accelerator

    from derm_accel.data.transforms import BatchNormalize, decode_size, eval_input, with_transform
    from derm_accel.evaluation.calibration import tta_probabilities
    from derm_accel.evaluation.inference import predict_logits
    from derm_accel.models.build import data_config
    from derm_accel.models.load import load_model
    from derm_accel.training.train import train

    shutil.rmtree(run_dir, ignore_errors=True)
    run = Path(train(recipe_dict(name, fold_dir, run_dir, args)))
    net, _ = load_model(str(run / "best"))
    cfg = data_config(net)
    transform, decode = eval_input(cfg)
    test = load_converted(fold_dir)["test"]
    min_size = decode_size(cfg["input_size"][-1], cfg.get("crop_pct"))
    split = with_transform(test, transform, min_size=min_size, decode=decode)
    result = predict_logits(
        net, split, Accelerator(), batch_size=64, num_workers=0, tta="flip", normalize=BatchNormalize(cfg)
    )
    y = result.labels.numpy()
    info = json.loads((run / "best" / "training_info.json").read_text())
    out = {
        name: classification_metrics(y, tta_probabilities(result.logits[:, :1]).argmax(-1).numpy()),
        f"{name}+tta": classification_metrics(y, tta_probabilities(result.logits).argmax(-1).numpy()),
        "best_epoch": info.get("best_epoch"),
        "num_test": len(y),
    }
    if args.target:
        out.update(score_target(name, net, cfg, args))
    return out


# --------------------------------------------------------------------------------------- across collections
def target_split(net_labels: list[str], args: argparse.Namespace) -> tuple[Any, np.ndarray]:
    """Every image of ``--target`` (all splits) whose class maps onto a model class, and those model classes.

    ``--target-label-map`` maps target classes to the model's (YAML/JSON, null for none), as ``evaluate
    --label-map`` does; unlisted classes map to a model class of the same name, others are left out."""
    from datasets import concatenate_datasets, load_from_disk

    from derm_accel.evaluation.label_map import load_label_map, resolve_label_map

    data = load_from_disk(str(args.target))
    pooled = concatenate_datasets([data[s] for s in data])
    names = list(pooled.features["label"].names)
    given = load_label_map(args.target_label_map) if args.target_label_map else {}
    mapping = resolve_label_map(given, names, net_labels)
    target = np.asarray(mapping.target)[np.asarray(pooled["label"])]
    keep = np.flatnonzero(target >= 0)
    return pooled.select(keep), target[keep]


def cross_metrics(labels: np.ndarray, predicted: np.ndarray, model_labels: list[str]) -> dict[str, Any]:
    """Balanced accuracy and macro-F1 over the classes present in ``labels``; predicting any other class of
    the model is an error. Recall per present class beside them."""
    from sklearn.metrics import f1_score, recall_score

    present = sorted(set(labels.tolist()))
    recall = recall_score(labels, predicted, labels=present, average=None, zero_division=0)
    return {
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        "balanced_accuracy": float(np.mean(recall)),
        "accuracy": float(np.mean(labels == predicted)),
        "recall": {model_labels[c]: round(float(r), 4) for c, r in zip(present, recall, strict=True)},
        "num_images": len(labels),
    }


def score_target(name: str, net: Any, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The fold model on the other collection: rows ``NAME@target`` and ``NAME+tta@target``."""
    from accelerate import Accelerator

    from derm_accel.data.transforms import BatchNormalize, decode_size, eval_input, with_transform
    from derm_accel.evaluation.calibration import tta_probabilities
    from derm_accel.evaluation.inference import predict_logits

    labels = list(net.pretrained_cfg["label_names"])
    split, y = target_split(labels, args)
    transform, decode = eval_input(cfg)  # the model's own preprocessing, colour constancy included
    min_size = decode_size(cfg["input_size"][-1], cfg.get("crop_pct"))
    data = with_transform(split, transform, min_size=min_size, decode=decode)  # its own labels ride along, unused
    logits = predict_logits(
        net, data, Accelerator(), batch_size=64, num_workers=0, tta="flip", normalize=BatchNormalize(cfg)
    ).logits
    return {
        f"{name}@target": cross_metrics(y, tta_probabilities(logits[:, :1]).argmax(-1).numpy(), labels),
        f"{name}+tta@target": cross_metrics(y, tta_probabilities(logits).argmax(-1).numpy(), labels),
    }


# ------------------------------------------------------------------------------------------------ runner
def _without_unset(value: Any) -> Any:
    """The recipe without keys that are null, 0 or false (off): an option added later keeps the cache valid."""
    if isinstance(value, dict):
        return {k: _without_unset(v) for k, v in value.items() if v is not None and v is not False and v != 0}
    return value


def cache_key(name: str, args: argparse.Namespace) -> str:
    if name == BASELINE:
        spec: Any = [args.model, args.epochs, args.batch_size, args.plain_lr, args.seed, "plain-v1"]
    else:
        spec = _without_unset(recipe_dict(name, Path("DATA"), Path("RUN"), args))
        if args.target:  # results then hold the target rows too
            spec = [spec, str(Path(args.target).resolve()), args.target_label_map]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def run_fold(name: str, fold: int, fold_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.work) / "results" / f"{name}-{cache_key(name, args)}-fold{fold}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    started = time.time()
    if name == BASELINE:
        result = plain_fold(fold_dir, args)
    else:
        result = recipe_fold(name, fold_dir, Path(args.work) / "runs" / f"{name}-fold{fold}", args)
    result.update(fold=fold, seconds=round(time.time() - started, 1))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] {name} fold {fold}: {json.dumps(result)}", flush=True)
    return result


def summarize(per_fold: dict[str, list[dict[str, Any]]], reference: str = "quickstart") -> dict[str, Any]:
    """Rows (recipe and recipe+tta) with each metric's mean/sd/interval and the paired difference to plain;
    rows on the other collection (``NAME@target``) are paired with ``reference``'s instead (plain has none)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for results in per_fold.values():
        for result in results:
            for row, metrics in result.items():
                if isinstance(metrics, dict):
                    for metric in METRICS:
                        rows.setdefault(row, {}).setdefault(metric, []).append(metrics[metric])
    base = rows.get(BASELINE)
    out: dict[str, Any] = {}
    for row, values in rows.items():
        out[row] = {m: mean_sd_ci(v) for m, v in values.items()}
        if row.endswith(TARGET):
            ref = reference_row(row, reference)
            if ref in rows and ref != row and len(rows[ref]["macro_f1"]) == len(values["macro_f1"]):
                out[row]["vs_reference"] = {m: paired_difference(values[m], rows[ref][m]) for m in METRICS}
        elif base is not None and row != BASELINE and len(base["macro_f1"]) == len(values["macro_f1"]):
            out[row]["vs_plain"] = {m: paired_difference(values[m], base[m]) for m in METRICS}
    return out


def reference_row(row: str, reference: str) -> str:
    """The row a target row is paired with: the reference recipe, single view or TTA like ``row``."""
    return f"{reference}{'+tta' if '+tta@' in row else ''}{TARGET}"


def markdown(summary: dict[str, Any], folds_run: int, folds: int, reference: str = "quickstart") -> str:
    def cell(s: dict[str, Any]) -> str:
        return f"{s['mean']:.3f}" + (f" ± {s['sd']:.3f}" if s["n"] > 1 else "")

    def diff(s: dict[str, Any] | None) -> str:
        if s is None:
            return ""
        interval = f" [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]" if s["n"] > 1 else " (one fold: no interval)"
        return f"{s['mean']:+.3f}{interval}"

    lines = [
        "| recipe | folds | macro-F1 | balanced acc. | accuracy | Δ macro-F1 vs plain (95% t-interval) |",
        "|---|---|---|---|---|---|",
    ]
    target_lines = [
        f"| recipe, on --target | folds | balanced acc. | macro-F1 | Δ balanced acc. vs {reference} | "
        f"Δ macro-F1 vs {reference} |",
        "|---|---|---|---|---|---|",
    ]
    for row, s in summary.items():
        n = s["macro_f1"]["n"]
        if row.endswith(TARGET):
            vs = s.get("vs_reference", {})
            target_lines.append(
                f"| {row} | {n} of {folds} | {cell(s['balanced_accuracy'])} | {cell(s['macro_f1'])} | "
                f"{diff(vs.get('balanced_accuracy'))} | {diff(vs.get('macro_f1'))} |"
            )
            continue
        vs = s.get("vs_plain", {}).get("macro_f1")
        lines.append(
            f"| {row} | {n} of {folds} | {cell(s['macro_f1'])} | {cell(s['balanced_accuracy'])} | "
            f"{cell(s['accuracy'])} | {diff(vs)} |"
        )
    table = "\n".join(lines) + "\n"
    if len(target_lines) > 2:
        table += "\n" + "\n".join(target_lines) + "\n"
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="converted dataset (derm-accel convert)")
    p.add_argument("--recipes", default="plain,quickstart", help=f"comma-separated; plain or {', '.join(CANDIDATES)}")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold-limit", type=int, default=None, help="run only the first N folds (quick ablations)")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained-file", required=True, help="timm-layout ImageNet weights folder")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--plain-lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-column", default=None, help="e.g. patient_id: rows sharing it stay in one fold")
    p.add_argument("--target", default=None, help="another converted collection: every fold model is scored on it")
    p.add_argument("--target-label-map", default=None, help="YAML/JSON: target class -> model class (null: none)")
    p.add_argument("--reference", default="quickstart", help="the recipe target rows are paired with")
    p.add_argument("--set", action="append", help="extra override for every derm-accel recipe (key=value)")
    p.add_argument("--work", default="bench-recipes", help="fold datasets, runs and cached per-fold results")
    p.add_argument("--out", default=None, help="results JSON (default WORK/recipes.json; .md beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n != BASELINE and n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from plain, {', '.join(CANDIDATES)}")
    fold_dirs = make_fold_datasets(
        args.data, Path(args.work) / "folds", args.folds, seed=args.seed, group_column=args.group_column
    )
    fold_dirs = fold_dirs[: args.fold_limit or args.folds]
    per_fold = {n: [run_fold(n, k + 1, d, args) for k, d in enumerate(fold_dirs)] for n in names}
    summary = summarize(per_fold, args.reference)
    results = {
        "command": " ".join(["python", "benchmarks/recipes.py", *(argv if argv is not None else sys.argv[1:])]),
        "folds": args.folds,
        "folds_run": len(fold_dirs),
        "settings": {k: v for k, v in vars(args).items() if k not in ("recipes",)},
        "recipes": {n: ([] if n == BASELINE else CANDIDATES[n]) for n in names},
        "per_fold": per_fold,
        "summary": summary,
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out or Path(args.work) / "recipes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(summary, len(fold_dirs), args.folds, args.reference)
    out.with_suffix(".md").write_text(f"`{results['command']}`\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
