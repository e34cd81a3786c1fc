"""The training stage: a plain PyTorch loop driven by Accelerate, from a laptop CPU to several GPU nodes.

``train()`` reads top to bottom like torchvision's classification reference: :func:`setup` builds the
Accelerator, data, model, optimizer, schedule, EMA and loss, prepared by Accelerate, into a :class:`Run`;
:func:`resume_state` restores a checkpoint's :class:`TrainState`; then each epoch is :func:`train_one_epoch`
(steps under ``accelerator.accumulate``) and :func:`end_epoch` (validate with ``gather_for_metrics``, log,
export the best model, checkpoint, early stopping); :func:`finish` says why it stopped and closes the run.

Launch with ``accelerate launch -m derm_accel train --recipe recipes/effnet_b3_plus.yaml`` (or
``derm-accel train`` for one process). The same recipe, seed and data give the same batches on any number
of processes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from derm_accel.core.artifacts import (
    RECIPE,
    RUN_INFO,
    TRAINING_INFO,
    TRAINING_ROWS,
    VAL_METRICS,
    TrainingInfo,
    ValMetrics,
)
from derm_accel.core.distributed import (
    is_collective_failure,
    lost_rank_error,
)
from derm_accel.core.errors import RunError
from derm_accel.core.fileio import atomic_write_json
from derm_accel.core.paths import shareable_path
from derm_accel.core.run_info import collect_run_info, device_name
from derm_accel.core.version import __version__
from derm_accel.data.report import dataset_provenance
from derm_accel.data.trained_rows import training_rows
from derm_accel.evaluation.cv_stats import macro_f1
from derm_accel.guard.fit import fit_model_guard
from derm_accel.models.build import base_weights, export_model
from derm_accel.training.checkpoint_files import nonfinite_parameters
from derm_accel.training.checkpoints import (
    TrainState,
    save_checkpoint,
)
from derm_accel.training.config import Recipe, load_recipe
from derm_accel.training.setup import (
    BEST_DIR,
    Run,
    flat_config,
    published_recipe,
    recipe_color_constancy,
    resume_checks,
    resume_state,
    setup,
)


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; the run stopped before the bad step touched the weights."""


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: Any,
    accelerator: Accelerator,
    *,
    channels_last: bool = False,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 (over the classes present, as evaluate reports it) over the whole split, each
    sample counted exactly once across processes.

    ``normalize`` turns uint8 batches into the model's input on the device (:class:`BatchNormalize`).
    """
    model.eval()
    preds, labels, losses = [], [], []
    show = accelerator.is_main_process
    for batch in tqdm(loader, desc="validate", unit="batch", disable=not show or None, leave=False):
        inputs = batch["pixel_values"]
        if normalize is not None:
            inputs = normalize(inputs)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        preds.append(gathered[0].cpu())
        labels.append(gathered[1].cpu())
        losses.append(gathered[2].float().cpu())
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return {
        "loss": float(torch.cat(losses).mean()),
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": macro_f1(y_true, y_pred),  # over the classes present, as evaluate reports it
        "num_samples": len(y_true),
    }


# Why training ends before train.epochs; train_one_epoch and end_epoch return one of these, or None to go on.
STEP_LIMIT = "train.stop_after_steps"  # this invocation ran its steps; a checkpoint holds the position
EARLY_STOPPING = "train.early_stopping_patience"  # val macro-F1 stopped improving


@dataclass
class EpochStats:
    """What :func:`train_one_epoch` hands :func:`end_epoch`."""

    stop: str | None = None  # STEP_LIMIT when the epoch was left part-way (checkpointed); None: it ran to its end
    loss: float = 0.0  # mean train loss of all the epoch's batches, those run before a resume included
    images_per_s: float = 0.0


def train(
    recipe: str | Path | Recipe,
    overrides: list[str] | None = None,
    resume: str | None = None,
    resume_with_changes: bool = False,
) -> Path:
    """Train the recipe's model; return the run folder (``RUN/best`` holds the exported best model).

    On resume the recipe is compared with the checkpoint's (:mod:`derm_accel.training.resume`): changes a resume may
    take are applied and named, others are refused unless ``resume_with_changes``.
    """
    recipe = load_recipe(recipe, overrides)
    checkpoint, changes = resume_checks(recipe, resume, resume_with_changes)  # before anything is built
    run = setup(recipe, resume)
    state = resume_state(run, checkpoint, changes)
    start_logging(run, state, resumed=bool(resume))
    stop = None
    try:
        for epoch in range(state.epoch, recipe.train.epochs):
            stats = train_one_epoch(run, state, epoch)
            stop = stats.stop or end_epoch(run, state, epoch, stats)
            if stop:
                break
    except Exception as e:  # a rank died or hangs: name it on the survivors instead of a bare backend error
        if not is_collective_failure(e):
            raise
        where = f"at epoch {state.epoch + 1}, after optimizer step {state.global_step}"
        raise lost_rank_error(e, where, recipe.train.dist_timeout_s) from e
    finish(run, state, stop)
    return run.run_dir


# --- set-up ---------------------------------------------------------------------------------------------------


def start_logging(run: Run, state: TrainState, *, resumed: bool) -> None:
    """Start the trackers and write the run folder's recipe.yaml and run_info.json (main process)."""
    acc = run.accelerator
    acc.init_trackers("train", config=flat_config(run.recipe.to_dict()))
    if not acc.is_main_process:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / RECIPE).write_text(run.recipe.to_yaml())
    run_info = collect_run_info(acc)
    run_info.update(label_names=run.label_names, data_config=run.data_cfg, updates_per_epoch=run.updates_per_epoch)
    run_info["recipe_changes"] = state.recipe_changes  # each accepted change and the step it took effect
    atomic_write_json(run.run_dir / RUN_INFO, run_info, default=str)
    if resumed:  # steps logged after that checkpoint are run, and logged, again
        acc.get_tracker("jsonl").mark_resume(state.global_step, state.epoch)


# --- the epoch --------------------------------------------------------------------------------------------------


class _MeanLoss:
    """Running mean of per-batch losses, kept on the device (no sync per step); ``prior`` is the (mean, count)
    of batches run before a resume."""

    def __init__(self, device: torch.device, prior: tuple[float, int] = (0.0, 0)) -> None:
        self.sum, self.count, self.prior = torch.zeros((), device=device), 0, prior

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> float:
        """The mean over all processes (every process must call this)."""
        mean, count = self.prior
        return accelerator.reduce((self.sum + mean * count) / max(self.count + count, 1), "mean").item()


def _step_limit_reached(run: Run, state: TrainState) -> bool:
    limit = run.recipe.train.stop_after_steps
    return limit is not None and state.global_step - run.first_step >= limit


def train_one_epoch(run: Run, state: TrainState, epoch: int) -> EpochStats:
    """Train ``epoch`` from ``state.batches_done``; leave it part-way, checkpointed, at ``train.stop_after_steps``."""
    acc, o, t = run.accelerator, run.recipe.optim, run.recipe.train
    run.model.train()
    run.train_dl.set_epoch(epoch)  # reseeds the sampler: the order depends only on (seed, epoch)
    loader = acc.skip_first_batches(run.train_dl, state.batches_done) if state.batches_done else run.train_dl
    epoch_loss = _MeanLoss(acc.device, prior=tuple(state.partial_epoch_loss))
    window, images, stop, left_early = _MeanLoss(acc.device), 0, None, False
    started, paused = time.perf_counter(), 0.0
    with tqdm(
        total=run.updates_per_epoch,
        initial=math.ceil(state.batches_done / o.grad_accum),
        desc=f"epoch {epoch + 1}/{t.epochs}",
        disable=not acc.is_main_process,
    ) as progress:
        for batch in loader:
            loss = train_step(run, state, batch, epoch)
            state.batches_done += 1
            images += batch["labels"].shape[0]
            epoch_loss.add(loss)
            window.add(loss)
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            if run.ema is not None:
                run.ema.update(acc.unwrap_model(run.model, keep_torch_compile=False), step=state.global_step)
            progress.update(1)
            if state.global_step % t.log_every_steps == 0:
                _log_step(run, state, epoch, window.reduce(acc), progress)
                window = _MeanLoss(acc.device)
            if t.max_steps_per_epoch and math.ceil(state.batches_done / o.grad_accum) >= t.max_steps_per_epoch:
                left_early = True
                break
            stop = STEP_LIMIT if _step_limit_reached(run, state) else None
            if stop or (t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0):
                pause = time.perf_counter()
                state.partial_epoch_loss = [epoch_loss.reduce(acc), epoch_loss.count + epoch_loss.prior[1]]
                checkpoint(run, state)
                paused += time.perf_counter() - pause
            if stop:
                left_early = True
                break
    if left_early and hasattr(loader, "end"):
        loader.end()  # unregister it from Accelerate's gradient state (an exhausted loader does so itself)
    if stop:
        return EpochStats(stop)
    seconds = time.perf_counter() - started - paused
    state.train_images += images * acc.num_processes
    state.train_seconds += seconds
    return EpochStats(None, epoch_loss.reduce(acc), images * acc.num_processes / max(seconds, 1e-9))


def train_step(run: Run, state: TrainState, batch: dict[str, torch.Tensor], epoch: int) -> torch.Tensor:
    """Forward and backward of one batch; the optimizer steps every ``optim.grad_accum`` batches. Returns the
    detached loss."""
    acc, o = run.accelerator, run.recipe.optim
    inputs, labels = run.normalize(batch["pixel_values"]), batch["labels"]
    if run.recipe.train.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with acc.accumulate(run.model):
        if run.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            inputs, targets = run.mixup(inputs, labels)
            loss = SoftTargetCrossEntropy()(run.model(inputs), targets)
        else:
            loss = run.loss_fn(run.model(inputs), labels)
        _check_finite(run, state, loss, epoch)
        acc.backward(loss)
        if acc.sync_gradients and o.grad_clip:
            acc.clip_grad_norm_(run.model.parameters(), o.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


def _check_finite(run: Run, state: TrainState, loss: torch.Tensor, epoch: int) -> None:
    """Every process checks every step, so all stop together before a bad gradient is applied."""
    losses = run.accelerator.gather(loss.detach().float().reshape(1))
    if torch.isfinite(losses).all().item():
        return
    bad = {rank: value for rank, value in enumerate(losses.tolist()) if not math.isfinite(value)}
    raise NonFiniteLossError(
        f"Loss is {bad} (process: value) at epoch {epoch + 1}, "
        f"batch {state.batches_done + 1} (after optimizer step {state.global_step}). "
        f"Last good checkpoint: {run.last_checkpoint or 'none'} (its weights are finite). Lower optim.lr, set "
        f"optim.grad_clip, or use bf16 instead of fp16, then continue with --resume latest --resume-with-changes "
        f"(e.g. --set optim.lr=...)."
    )


def _log_step(run: Run, state: TrainState, epoch: int, train_loss: float, progress: tqdm) -> None:
    lr = max(run.scheduler.get_last_lr())
    run.accelerator.log({"train/loss": train_loss, "train/lr": lr, "epoch": epoch + 1}, step=state.global_step)
    progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")


def checkpoint(run: Run, state: TrainState) -> None:
    """Save everything a resume needs (every process calls this); weights that are no longer finite are never
    checkpointed, so the last checkpoint is always one to go back to."""
    bad = nonfinite_parameters(run.accelerator.unwrap_model(run.model, keep_torch_compile=False))
    if run.ema is not None:
        bad += [f"ema.{name}" for name in nonfinite_parameters(run.ema.module)]
    if bad:
        raise NonFiniteLossError(
            f"The weights hold NaN/inf after optimizer step {state.global_step} ({len(bad)} tensors, first: "
            f"{bad[0]}); this state was not checkpointed. Last checkpoint with finite weights: "
            f"{run.last_checkpoint or 'none'}. Lower optim.lr or set optim.grad_clip, then continue with "
            f"--resume latest --resume-with-changes (e.g. --set optim.lr=...)."
        )
    now = time.time()
    state.wall_seconds += now - run.clock
    run.clock = now
    run.last_checkpoint = save_checkpoint(
        run.accelerator,
        run.run_dir,
        state,
        keep=run.recipe.train.keep_checkpoints,
        ema=run.ema,
        recipe=run.recipe.to_dict(),
    )


# --- after each epoch, and at the end ---------------------------------------------------------------------------


def end_epoch(run: Run, state: TrainState, epoch: int, stats: EpochStats) -> str | None:
    """Validate (the EMA when EMA is on), log, export a better model, checkpoint; return why to stop, if so."""
    acc, t = run.accelerator, run.recipe.train
    metrics = validate(
        run.eval_model(),
        run.val_dl,
        acc,
        channels_last=t.channels_last,
        normalize=run.normalize,
    )
    record = {
        "epoch": epoch + 1,
        "train/loss_epoch": stats.loss,
        "train/lr": max(run.scheduler.get_last_lr()),
        "train/images_per_s": stats.images_per_s,
        **{f"val/{k}": v for k, v in metrics.items()},
    }
    acc.log(record, step=state.global_step)
    acc.print(
        f"epoch {epoch + 1}: train loss {stats.loss:.4f}, val loss {metrics['loss']:.4f}, "
        f"acc {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, {stats.images_per_s:.1f} img/s"
    )
    state.history.append(record)
    state.epoch, state.batches_done, state.partial_epoch_loss = epoch + 1, 0, [0.0, 0]
    if metrics["macro_f1"] > state.best_macro_f1:
        state.best_macro_f1, state.best_epoch, state.bad_epochs = metrics["macro_f1"], epoch + 1, 0
        if acc.is_main_process:
            export_best(run, state, {"split": run.recipe.data.val_split, "epoch": epoch + 1, **metrics})
    else:
        state.bad_epochs += 1
    checkpoint(run, state)
    if t.early_stopping_patience and state.bad_epochs >= t.early_stopping_patience:
        return EARLY_STOPPING
    if _step_limit_reached(run, state) and epoch + 1 < t.epochs:
        return STEP_LIMIT
    return None


def export_best(run: Run, state: TrainState, val_metrics: ValMetrics) -> None:
    """Write the model validated this epoch to ``RUN/best`` with its recipe, metrics, training info and rows."""
    d = run.recipe.data
    export_model(
        run.export_model(),
        run.run_dir / BEST_DIR,
        run.label_names,
        license=run.recipe.license or run.dataset_license,
        tta=run.recipe.model.tta,
        color_constancy=recipe_color_constancy(run.recipe),
        extra_files={
            RECIPE: published_recipe(run.recipe),
            VAL_METRICS: json.dumps(val_metrics, indent=2) + "\n",
            TRAINING_INFO: json.dumps(training_info(run, state), indent=2) + "\n",
            # the images it trained on, so that evaluate refuses to score it on any of them
            TRAINING_ROWS: json.dumps(training_rows(run.training_rows, d.path, d.train_split)) + "\n",
        },
    )


def training_info(run: Run, state: TrainState) -> TrainingInfo:
    """``best/training_info.json``: how the exported model was trained (published with it)."""
    acc, recipe = run.accelerator, run.recipe
    return {
        "epochs_run": state.epoch,
        "epochs_planned": recipe.train.epochs,
        "best_epoch": state.best_epoch,
        "best_val_macro_f1": state.best_macro_f1,
        "global_steps": state.global_step,
        "model": recipe.model.name,
        "input_size": list(run.data_cfg["input_size"]),
        # The pretrained weights it started from (the card's base_model) and the data it learnt from.
        "base_model": base_weights(
            recipe.model.name, pretrained=recipe.model.pretrained, pretrained_file=recipe.model.pretrained_file
        ),
        "dataset": dataset_provenance(recipe.data.path) or None,
        "ema": recipe.optim.ema,
        "mixed_precision": acc.mixed_precision,
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type.value),
        "device_name": device_name(acc.device),
        "train_images_per_s": state.train_images / max(state.train_seconds, 1e-9),
        "wall_time_s": state.wall_seconds + time.time() - run.clock,
        "dataset_path": shareable_path(recipe.data.path),  # published with the model: no absolute local paths
        "dataset_class_names": run.label_names,
        # Settings changed on resume, and from which step (values stay in the run folder's run_info.json).
        "recipe_changes": [{"step": c["step"], "keys": sorted(c["changes"])} for c in state.recipe_changes],
        # The recipe's license, else the one convert recorded for the images (--license).
        "license": recipe.license or run.dataset_license,
        "derm_accel_version": __version__,
    }


def stop_message(run: Run, state: TrainState, stop: str) -> str:
    if stop == EARLY_STOPPING:
        return (
            f"Early stopping: no better val macro-F1 for {state.bad_epochs} epochs "
            f"(best {state.best_macro_f1:.4f} at epoch {state.best_epoch})."
        )
    return f"Stopped after {state.global_step - run.first_step} steps (train.stop_after_steps); --resume latest"


def finish(run: Run, state: TrainState, stop: str | None) -> None:
    """Say why training stopped early; at an epoch's end, give the exported model's training_info the whole run."""
    acc = run.accelerator
    if stop:
        acc.print(stop_message(run, state, stop))
    best = run.run_dir / BEST_DIR
    if acc.is_main_process and best.is_dir() and state.batches_done == 0:
        info = {**training_info(run, state), "stopped_early": stop == EARLY_STOPPING}
        atomic_write_json(best / TRAINING_INFO, info)
    ended = stop == EARLY_STOPPING or (stop is None and state.epoch >= run.recipe.train.epochs)
    if acc.is_main_process and best.is_dir() and ended and run.recipe.guard.enabled:
        fit_guard(run, best)
    acc.wait_for_everyone()
    acc.end_training()


def fit_guard(run: Run, best: Path) -> None:
    """The exported model's domain guard and abstention threshold, from the training and validation splits."""
    d, g = run.recipe.data, run.recipe.guard
    config = fit_model_guard(
        best, d.path, train_split=d.train_split, val_split=d.val_split, in_domain_share=g.in_domain_share,
        target_error=g.target_error, target_coverage=g.target_coverage, max_fit_images=g.max_fit_images,
        seed=run.recipe.train.seed, batch_size=d.batch_size,
        device=str(run.accelerator.device),
    )
    guard, selective = config["domain_guard"], config["selective_prediction"]
    run.accelerator.print(
        f"domain guard: ood_score threshold {guard['threshold']:.2f}; abstain under top-1 probability "
        f"{selective['confidence_threshold']:.3f} ({selective['validation_coverage']:.0%} of validation answered, "
        f"error {selective['validation_risk']:.1%})"
    )
