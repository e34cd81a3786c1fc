"""Builders shared by the push/predict/model-card tests: a tiny exported timm model, an evaluation report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LABELS = ["melanoma", "nevus", "basal_cell_carcinoma"]
ARCH = "test_efficientnet"


def write_model_dir(
    root: Path, *, license: str | None = "cc-by-nc-4.0", seed: int = 0, guard: bool = False
) -> Path:
    """RUN/best as train writes it: a tiny timm model in Hub layout + recipe, training info, val metrics;
    with ``guard``, also a domain guard fitted on generated lesions (as train fits one on its training split)."""
    import torch

    from derm_accel.models.build import create_model, export_model

    torch.manual_seed(seed)
    model = create_model(ARCH, len(LABELS))
    # Small input so that tests stay fast on two cores.
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 64, 64))
    recipe: dict[str, Any] = {
        "model": {"name": ARCH, "pretrained": False},
        "data": {"path": "data/derm", "batch_size": 32},
        "optim": {"name": "adamw", "lr": 0.001},
        "train": {"epochs": 3, "mixed_precision": "bf16"},
    }
    if license:
        recipe["license"] = license
    info = {  # the keys derm_accel.train writes
        "epochs_run": 3,
        "epochs_planned": 3,
        "best_epoch": 2,
        "best_val_macro_f1": 0.66,
        "mixed_precision": "bf16",
        "num_processes": 2,
        "distributed_type": "MULTI_GPU",
        "device_name": "NVIDIA H100 80GB HBM3",
        "train_images_per_s": 1234.5,
        "wall_time_s": 61.2,
        "dataset_path": str((root / "data" / "derm").resolve()),
        "dataset_class_names": LABELS,
        "derm_accel_version": "0.1.0",
    }
    folder = export_model(
        model,
        root / "best",
        LABELS,
        extra_files={
            "recipe.yaml": yaml.safe_dump(recipe, sort_keys=False),
            "training_info.json": json.dumps(info, indent=2),
            "val_metrics.json": json.dumps({"accuracy": 0.71, "macro_f1": 0.66}),
        },
    )
    if guard:
        fit_generated_guard(model, folder)
    return folder


def fit_generated_guard(model: Any, folder: Path, *, train: int = 160, val: int = 120) -> None:
    """Fit and save a domain guard on generated lesion images (the classes of LABELS), like train does."""
    import timm
    import torch

    from derm_accel.data.synthetic import render
    from derm_accel.guard.fit import fit_guard, score_batches
    from derm_accel.guard.model import save_guard

    model = model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    def scored(seeds: range) -> Any:
        x = torch.stack([transform(render(s % len(LABELS), seed=s, size=96)) for s in seeds])
        y = torch.tensor([s % len(LABELS) for s in seeds])
        return score_batches(model, [(x, y)], "cpu")

    fitted, _ = fit_guard(scored(range(train)), scored(range(train, train + val)))
    save_guard(fitted, folder)


def write_report_dir(root: Path) -> Path:
    """REPORT/ as evaluate writes it (values are plausible, files small)."""
    report = root / "report"
    report.mkdir(parents=True)
    per_class = {
        "melanoma": {
            "precision": 0.61,
            "recall": 0.58,
            "f1": 0.595,
            "support": 40,
            "roc_auc": 0.88,
            "pr_auc": 0.6,
        },
        "nevus": {
            "precision": 0.83,
            "recall": 0.9,
            "f1": 0.864,
            "support": 120,
            "roc_auc": 0.93,
            "pr_auc": 0.9,
        },
        "basal_cell_carcinoma": {
            "precision": 0.7,
            "recall": 0.64,
            "f1": 0.669,
            "support": 25,
            "roc_auc": 0.9,
            "pr_auc": 0.7,
        },
    }
    metrics = {
        "split": "test",
        "num_samples": 185,
        "label_names": LABELS,
        "accuracy": 0.7838,
        "balanced_accuracy": 0.7067,
        "top3_accuracy": 1.0,
        "macro_precision": 0.7133,
        "macro_recall": 0.7067,
        "macro_f1": 0.7093,
        "weighted_precision": 0.78,
        "weighted_recall": 0.7838,
        "weighted_f1": 0.781,
        "roc_auc_macro": 0.9033,
        "roc_auc_micro": 0.92,
        "ece": 0.0412,
        "ci95": {"accuracy": [0.72, 0.84], "macro_f1": [0.63, 0.78]},
        "per_class": per_class,
        "confusion_matrix": [[23, 12, 5], [8, 108, 4], [7, 2, 16]],
        "classes_without_samples": [],
        "calibration": {
            "method": "temperature_scaling",
            "fitted_on": "validation",
            "temperature": 1.31,
            "before": {"accuracy": 0.7838, "ece": 0.0731, "nll": 0.71},
            "after": {"accuracy": 0.7838, "ece": 0.0412, "nll": 0.64},
        },
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (report / "per_class.csv").write_text(
        "class,precision,recall,f1,support\n"
        + "".join(f"{k},{v['precision']},{v['recall']},{v['f1']},{v['support']}\n" for k, v in per_class.items())
    )
    (report / "predictions.csv").write_text("source_path,label,pred,prob\nmelanoma/a.jpg,melanoma,nevus,0.61\n")
    from PIL import Image

    for i, name in enumerate(
        ("confusion_matrix.png", "roc_curves.png", "reliability.png", "misclassified_examples.png")
    ):
        Image.new("RGB", (16, 16), (200, 30 * i, 30)).save(report / name)
    (report / "misclassifications.md").write_text("# Misclassifications\n\n- melanoma/a.jpg -> nevus (0.61)\n")
    (report / "report.md").write_text("# Evaluation report\n\nAccuracy 0.784\n")
    return report


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that talks to the local Hub: set before huggingface_hub is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="10",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; fail with its output if it exits non-zero."""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc
