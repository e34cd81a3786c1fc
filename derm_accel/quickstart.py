"""The quickstart: the real stages, chained on a generated sample (or your folders), in a few minutes on a CPU.

It calls exactly the functions behind ``derm-accel convert``, ``train``, ``evaluate``, ``push`` and
``predict``, so a green quickstart means the whole product works on this machine.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from derm_accel.core.fileio import atomic_write_json
from derm_accel.data.convert import convert_folders
from derm_accel.data.synthetic import write_sample
from derm_accel.evaluation.run import evaluate_model
from derm_accel.hub.push import push_model
from derm_accel.inference.predict import predict
from derm_accel.training.train import train

# A small timm model that learns the generated sample from scratch in about a minute on two CPU cores.
DEFAULT_MODEL = "resnet10t"
DEFAULT_EPOCHS = 8
SAMPLE_CLASSES = 6
SAMPLE_PER_CLASS = 60


def _recipe(
    data_dir: Path, run_dir: Path, model: str, pretrained_file: Path | None, epochs: int, license: str
) -> dict[str, Any]:
    pretrained = pretrained_file is not None
    return {
        "model": {
            "name": model,
            "pretrained": False,
            "pretrained_file": str(pretrained_file.resolve()) if pretrained else None,
            "drop_rate": 0.1,
            "drop_path_rate": 0.0,
            # Flip TTA: +0.04 to +0.06 macro-F1 over the single view on every cross-validation fold of
            # derm-sample (docs/recipes.md). Recorded in config.json: evaluate, predict, serve and the demo use it.
            "tta": "flip",
        },
        "data": {
            "path": str(data_dir),
            "image_size": None if pretrained else 96,
            "batch_size": 32,
            "num_workers": 0,
            "pin_memory": False,
            "persistent_workers": False,
            "balance": "none",
            "augment": {"scale": [0.5, 1.0], "hflip": 0.5, "vflip": 0.5, "rotation": 0, "color_jitter": 0},
        },
        "optim": {
            "name": "adamw",
            "lr": 1e-3 if pretrained else 2e-3,
            "weight_decay": 0.01,
            "warmup_epochs": 0.3 if pretrained else 1,
            "label_smoothing": 0.1,
            "grad_clip": 1.0,
            "grad_accum": 1,
            "ema": False,
        },
        "train": {
            "epochs": epochs,
            "mixed_precision": "no",
            "channels_last": True,
            "compile": False,
            "seed": 0,
            "keep_checkpoints": 1,
            "early_stopping_patience": 0,
        },
        "output_dir": str(run_dir),
        "license": license,
    }


def _first_test_image(data_dir: Path, src: Path) -> Path:
    from datasets import load_from_disk

    test = load_from_disk(str(data_dir))["test"]
    return src / test[0]["source_path"]


def run_quickstart(
    workdir: str | Path = "derm-accel-quickstart",
    *,
    data: str | Path | None = None,
    model: str | None = None,
    pretrained_file: str | Path | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Convert, train, evaluate, push (dry run) and predict; every output lands under ``workdir``."""
    workdir = Path(workdir).resolve()
    marker = workdir / ".derm-accel-quickstart"
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.exists():
        # A re-run replaces the quickstart's own outputs; never delete anything in a folder it did not make.
        raise ValueError(f"{workdir} is not empty and was not made by the quickstart; pass another --workdir.")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    pretrained = Path(pretrained_file) if pretrained_file else None
    if pretrained is not None and not pretrained.exists():
        raise FileNotFoundError(f"--pretrained-file {pretrained} does not exist")
    model = model or DEFAULT_MODEL
    epochs = epochs or DEFAULT_EPOCHS
    timings: dict[str, float] = {}
    start = time.perf_counter()

    if data is None:
        src = workdir / "sample"
        if not src.exists():
            write_sample(src, num_classes=SAMPLE_CLASSES, per_class=SAMPLE_PER_CLASS, size=128, seed=0)
        license = "apache-2.0"  # the generated sample is part of derm-accel
    else:
        src = Path(data).resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"--data {src} is not a folder of class folders")
        license = "other"  # the license of the user's images is unknown to us: the card says so

    # Outputs of an earlier quickstart in this workdir are replaced, never mixed with the new run.
    data_dir, run_dir, report_dir, hub_dir = (workdir / n for n in ("data", "run", "report", "hub"))
    for folder in (run_dir, report_dir, hub_dir):
        shutil.rmtree(folder, ignore_errors=True)

    t = time.perf_counter()
    report = convert_folders(
        src, data_dir, overwrite=True, seed=0, max_size=160, progress=False, license=None if data else license
    )
    timings["convert"] = time.perf_counter() - t

    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(_recipe(data_dir, run_dir, model, pretrained, epochs, license), sort_keys=False)
    )
    t = time.perf_counter()
    run_dir = Path(train(recipe_path))
    timings["train"] = time.perf_counter() - t
    best = run_dir / "best"

    t = time.perf_counter()
    # With the model's own test-time augmentation (flip, from its config.json); the report shows the single view.
    metrics = evaluate_model(str(best), data_dir, split="test", out_dir=report_dir, batch_size=64, num_workers=0)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    repo_name = f"derm-accel-{model.replace('/', '-')}"
    staged = push_model(best, f"local/{repo_name}", report_dir=report_dir, dry_run=True, out=hub_dir)
    timings["push"] = time.perf_counter() - t

    image = _first_test_image(data_dir, src)
    prediction = predict(str(image), model=str(best), top_k=3)[0]
    atomic_write_json(workdir / "prediction.json", prediction)
    timings["total"] = time.perf_counter() - start

    summary = {
        "workdir": str(workdir),
        "images": report.get("rows_total"),
        "skipped": len(report.get("skipped", [])),
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "num_test": metrics["num_samples"],
        "guard": (metrics.get("out_of_domain") or {}).get("guard"),
        "model": model,
        "data": str(data_dir),
        "run": str(run_dir),
        "weights": str(best / "model.safetensors"),
        "report": str(report_dir / "report.md"),
        "model_card": str(Path(staged) / "README.md"),
        "prediction": prediction,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(workdir / "summary.json", summary)
    summary["text"] = _summary_text(summary, src)
    return summary


def _summary_text(s: dict[str, Any], src: Path) -> str:
    p = s["prediction"]
    guess = f"{p['label']} ({p['probability']:.2f})" if "label" in p else f"error: {p.get('error')}"
    return "\n".join(
        [
            "",
            f"derm-accel quickstart finished in {s['timings_s']['total']:.0f} s ({s['model']}, {s['images']} images)",
            f"  test accuracy   {s['test_accuracy']:.3f}   macro-F1 {s['test_macro_f1']:.3f}   (n={s['num_test']}, "
            "flip TTA)",
            _guard_line(s.get("guard")),
            f"  dataset         {s['data']}",
            f"  weights         {s['weights']}",
            f"  report          {s['report']}",
            f"  model card      {s['model_card']}",
            f"  one prediction  {Path(p['path']).name} -> {guess}",
            "",
            "The same on your own class folders:",
            "  derm-accel convert YOUR_FOLDERS data/derm",
            "  derm-accel train --recipe recipes/effnet_b3.yaml \\",
            "      --set data.path=data/derm --set output_dir=runs/effnet_b3",
            "  derm-accel evaluate --model runs/effnet_b3/best --data data/derm --out reports/effnet_b3",
            "  derm-accel push runs/effnet_b3/best --repo-id ORG/NAME --report reports/effnet_b3",
            "  derm-accel predict photo.jpg --model ORG/NAME",
            f"(source images: {src})",
        ]
    )


def _guard_line(guard: dict[str, Any] | None) -> str:
    if not guard:
        return "  domain guard    none"
    answered = guard.get("answered")
    abstain = "" if answered is None else f", {answered:.0%} answered after abstention"
    return f"  domain guard    flags {guard['in_domain_flagged']:.0%} of the test images as out of domain{abstain}"
