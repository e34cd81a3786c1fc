"""Atomic ``accelerator.save_state`` checkpoints with keep-last-K and resume.

A checkpoint is written into a hidden temporary folder and renamed into place only when every process has
finished writing, so a job killed mid-save never leaves a half checkpoint that ``--resume latest`` would pick.
Beside Accelerate's files each checkpoint holds ``trainer_state.json``: the position in the run (epoch,
batches done in it, optimizer steps) and the early-stopping bookkeeping.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")


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
    trainer_state: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Save model, optimizer, scheduler, scaler, RNG and registered objects; then prune to the last ``keep``.

    Every process must call this (Accelerate writes one RNG file per process).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(int(trainer_state["global_step"]))
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(trainer_state, indent=2) + "\n")
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


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` saved; return the trainer state."""
    checkpoint = Path(checkpoint)
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_NAME).read_text())
