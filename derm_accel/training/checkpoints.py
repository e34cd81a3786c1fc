"""Atomic ``accelerator.save_state`` checkpoints with keep-last-K and resume.

A checkpoint is written into a hidden temporary folder and renamed into place only when every process has
finished writing, so a job killed mid-save never leaves a half checkpoint that ``--resume latest`` would pick.
Beside Accelerate's files each checkpoint holds ``trainer_state.json``: a :class:`TrainState`, the position
in the run (epoch, batches done in it, optimizer steps) and the early-stopping bookkeeping; ``recipe.json``,
the recipe the run used; ``ema.safetensors`` with EMA on; one ``rng_state_<rank>.safetensors`` per process;
and ``manifest.json`` (size and sha256 of every file). Nothing is unpickled on resume
(:mod:`derm_accel.training.checkpoint_files`): Accelerate's pickled RNG files are replaced, and the manifest is checked
before anything is loaded. ``--resume latest`` falls back to the previous checkpoint when the newest fails
the check, saying which file failed.
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

from derm_accel.core.fileio import replace_dir
from derm_accel.training.checkpoint_files import (
    ACCELERATE_PICKLES,
    EMA_NAME,
    RECIPE_NAME,
    CheckpointError,
    load_module_file,
    load_tensors_file,
    restore_rng_state,
    rng_name,
    save_module_file,
    save_rng_state,
    verify_checkpoint,
    write_manifest,
)

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
    # Recipe changes accepted on resume: {"step", "epoch", "kind": "resumable"|"forced", "changes": {key: [old, new]}}.
    recipe_changes: list[dict[str, Any]] = field(default_factory=list)

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
    ema: Any | None = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Save model, optimizer, scheduler, scaler, RNG, the EMA and the recipe, then the manifest; then prune to
    the last ``keep``.

    Every process must call this (each writes its own RNG file).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(trainer_state.global_step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for pattern in ACCELERATE_PICKLES:  # pickles: never kept, this process's RNG goes to a safe file instead
        for path in tmp.glob(pattern):
            path.unlink(missing_ok=True)
    save_rng_state(tmp / rng_name(accelerator.process_index), accelerator.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(trainer_state.to_dict(), indent=2) + "\n")
        if ema is not None:
            save_module_file(ema, tmp / EMA_NAME)
        if recipe is not None:
            (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
        write_manifest(tmp)
        replace_dir(tmp, final)  # the same step may be saved again (epoch end right after a step checkpoint)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def set_aside_later_checkpoints(run_dir: str | Path, resumed: Path) -> list[Path]:
    """Rename this run's checkpoints after ``resumed`` to hidden ``.abandoned-step_N`` folders.

    A run resumed from an earlier checkpoint (a damaged newest one, or an explicit rollback) starts a new
    timeline: the later checkpoints must neither outlive the new ones when pruning nor be picked by the next
    ``--resume latest``. They are kept, not deleted, and never listed again. Returns their new paths.
    """
    match = _NAME.match(Path(resumed).name)
    if match is None or Path(resumed).parent != Path(run_dir) / CHECKPOINT_DIR:
        return []
    step = int(match.group(1))
    moved = []
    for later in list_checkpoints(run_dir):
        if int(_NAME.match(later.name).group(1)) > step:
            target = later.with_name(f".abandoned-{later.name}")
            shutil.rmtree(target, ignore_errors=True)
            later.rename(target)
            moved.append(target)
    return moved


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


def verified_checkpoint(resume: str, run_dir: str | Path, say: Any = print) -> Path:
    """The checkpoint ``resume`` names, checked against its manifest. For ``latest`` (or a run folder) a
    damaged newest checkpoint is reported through ``say`` and the previous one is tried; a checkpoint named
    explicitly must pass. Raises :class:`CheckpointError` naming the bad file."""
    chosen = resolve_checkpoint(resume, run_dir)
    path = Path(resume)
    candidates = [chosen]
    if resume == "latest" or not (path / STATE_NAME).exists():
        candidates = list(reversed(list_checkpoints(chosen.parent.parent)))
    errors = []
    for candidate in candidates:
        try:
            extra = verify_checkpoint(candidate)
        except CheckpointError as e:
            errors.append(str(e))
            say(f"cannot resume from {candidate}: {e}")
            continue
        if extra:
            say(f"{candidate}: ignoring files the manifest does not list (never read): {extra}")
        if errors:
            say(f"falling back to {candidate}, the newest checkpoint that passes its manifest check")
        return candidate
    raise CheckpointError(
        f"no checkpoint to resume from passes its manifest check: {'; '.join(errors)}. Start a new output_dir, "
        f"or restore the named files."
    )


def read_recipe(checkpoint: str | Path) -> dict[str, Any] | None:
    """The recipe a checkpoint was written with (None for checkpoints older than ``recipe.json``)."""
    path = Path(checkpoint) / RECIPE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def read_state(checkpoint: str | Path) -> TrainState:
    """The trainer state saved in ``checkpoint``, without loading the weights."""
    return TrainState.from_dict(json.loads((Path(checkpoint) / STATE_NAME).read_text()))


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path, *, ema: Any | None = None) -> TrainState:
    """Restore everything ``save_checkpoint`` saved (call :func:`verified_checkpoint` first); return the
    trainer state. Weights come from safetensors, the other states through ``torch.load(weights_only=True)``."""
    folder = Path(checkpoint)
    for i, model in enumerate(accelerator._models):
        load_module_file(model, folder / f"model{f'_{i}' if i else ''}.safetensors")
    for i, optimizer in enumerate(accelerator._optimizers):
        optimizer.load_state_dict(load_tensors_file(folder / f"optimizer{f'_{i}' if i else ''}.bin"))
    for i, scheduler in enumerate(accelerator._schedulers):
        scheduler.load_state_dict(load_tensors_file(folder / f"scheduler{f'_{i}' if i else ''}.bin"))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(load_tensors_file(folder / "scaler.pt"))
    if ema is not None:
        load_module_file(ema, folder / EMA_NAME)
    rng = folder / rng_name(accelerator.process_index)
    try:
        accelerator.step = restore_rng_state(rng)
    except Exception as e:
        raise CheckpointError(
            f"{rng} cannot be restored ({type(e).__name__}: {e}); resume with the same number of processes."
        ) from e
    return read_state(folder)
