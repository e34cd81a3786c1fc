"""Shared pieces of the training tests: a tiny converted-style DatasetDict and a tiny recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_dataset(
    root: Path,
    *,
    num_classes: int = 3,
    per_class: dict[str, list[int]] | None = None,
    size: int = 40,
) -> Path:
    """Write a DatasetDict with the schema `derm-accel convert` produces (JPEG bytes embedded)."""
    from derm_accel.data.synthetic import write_dataset

    sizes = {"train": 16, "validation": 5, "test": 3}
    split_counts = per_class or {split: [n] * num_classes for split, n in sizes.items()}
    return write_dataset(root, split_counts, size=size)


def tiny_recipe(data_path: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict for a ~100k-parameter model at 32 px; ``sections`` update model/data/optim/train."""
    recipe: dict[str, Any] = {
        "model": {"name": "test_efficientnet_gn", "drop_rate": 0.0, "drop_path_rate": 0.0},
        "data": {
            "path": str(data_path),
            "batch_size": 8,
            "num_workers": 0,
            "pin_memory": False,
            "image_size": 32,
            "augment": {"scale": [0.5, 1.0]},
        },
        "optim": {
            "name": "adamw",
            "lr": 3e-3,
            "weight_decay": 0.01,
            "warmup_epochs": 0.5,
            "label_smoothing": 0.1,
        },
        "train": {
            "epochs": 2,
            "seed": 7,
            "channels_last": False,
            "keep_checkpoints": 10,
            "log_every_steps": 1,
        },
        "output_dir": str(out),
        "license": "apache-2.0",
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; a second Accelerator in one process needs a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
