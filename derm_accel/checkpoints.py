"""Atomic ``accelerator.save_state`` checkpoints with keep-last-K and resume.

A checkpoint is written into a hidden temporary folder and renamed into place only when every process has
finished writing, so a job killed mid-save never leaves a half checkpoint that ``--resume latest`` would pick.
Beside Accelerate's files each checkpoint holds ``trainer_state.json``: a :class:`TrainState`, the position
in the run (epoch, batches done in it, optimizer steps) and the early-stopping bookkeeping.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Where a run stands; saved with every checkpoint as ``trainer_state.json`` and restored on resume."""

    epoch: int = 0  # epochs completed
    batches_done: int = 0  # per-process batches run in the current epoch
    global_step: int = 0  # optimizer steps
    best_macro_f1: float = -1.0
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the best val macro-F1
    train_images: int = 0  # over all processes, whole epochs only
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    # (mean, count) of the train loss of the current epoch's batches so far, so a resumed epoch reports them all.
    partial_epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0])
    # The position inside an epoch and the schedule are counted in per-process batches: a resume must run with
    # the same layout, or it would skip the wrong samples and jump the learning rate.
    layout: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read a saved state; keys a newer or older version wrote beside these are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def checkpoint_name(global_step: int) -> str:
    return f"step_{global_step:09d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_NAME).exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: str | Path,
    trainer_state: TrainState,
    *,
    keep: int,
) -> Path:
    """Save model, optimizer, scheduler, scaler, RNG and registered objects; then prune to the last ``keep``.

    Every process must call this (Accelerate writes one RNG file per process).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(trainer_state.global_step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(trainer_state.to_dict(), indent=2) + "\n")
        if final.exists():  # the same step saved again (e.g. epoch end right after a step checkpoint)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(resume: str, run_dir: str | Path) -> Path:
    """``"latest"``: newest complete checkpoint of ``run_dir``; a run folder: its newest; else the path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume latest: {Path(run_dir) / CHECKPOINT_DIR} holds no complete checkpoint. "
                f"Start without --resume, or pass the checkpoint folder explicitly."
            )
        return found[-1]
    path = Path(resume)
    if (path / STATE_NAME).exists():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise FileNotFoundError(
        f"--resume {resume}: not a checkpoint folder (no {STATE_NAME}) nor a run folder with checkpoints. "
        f"Use --resume latest or a path like RUN/{CHECKPOINT_DIR}/{checkpoint_name(1000)}."
    )


def read_state(checkpoint: str | Path) -> TrainState:
    """The trainer state saved in ``checkpoint``, without loading the weights."""
    return TrainState.from_dict(json.loads((Path(checkpoint) / STATE_NAME).read_text()))


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path) -> TrainState:
    """Restore everything ``save_checkpoint`` saved; return the trainer state."""
    accelerator.load_state(str(checkpoint))
    return read_state(checkpoint)
