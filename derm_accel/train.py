"""The training stage: a plain PyTorch loop driven by Accelerate, from a laptop CPU to several GPU nodes.

``train()`` reads top to bottom like Accelerate's ``complete_cv_example.py``: build the Accelerator, data,
model, optimizer and schedule; ``accelerator.prepare`` them; then for each epoch train under
``accelerator.accumulate``, validate with ``gather_for_metrics``, log, checkpoint and export the best model.

Launch with ``accelerate launch -m derm_accel train --recipe recipes/effnet_b3_plus.yaml`` (or
``derm-accel train`` for one process). The same recipe, seed and data give the same batches on any number
of processes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from sklearn.metrics import f1_score
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

import derm_accel
from derm_accel.checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from derm_accel.config import OptimConfig, Recipe, RecipeError, load_recipe
from derm_accel.data import loaders
from derm_accel.data.transforms import BatchNormalize, decode_size, eval_input, train_decode_size, train_transform
from derm_accel.distributed import use_cpu_ranks_without_gpu
from derm_accel.models import create_model, data_config, export_model
from derm_accel.paths import shareable_path
from derm_accel.run_info import collect_run_info, device_name
from derm_accel.tracking import JSONLTracker

BEST_DIR = "best"
LOG_DIR = "logs"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before the bad step touched the weights."""


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW through timm, with no weight decay on norm layers and biases."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, filter_bias_and_bn=True)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    *,
    updates_per_epoch: int,
    epochs: int,
    ticks_per_update: int,
) -> LambdaLR:
    """Linear warmup, then cosine (or constant) decay; counted in scheduler ticks.

    Accelerate's prepared scheduler ticks ``num_processes`` times per optimizer step
    (``ticks_per_update``), so the schedule is laid out in ticks and the learning rate at optimizer step k is
    the same on any number of processes.
    """
    unit = ticks_per_update
    warmup = round(cfg.warmup_epochs * updates_per_epoch) * unit
    total = max(epochs * updates_per_epoch * unit, warmup + unit)

    def factor(tick: int) -> float:
        if tick < warmup:
            return (tick + unit) / (warmup + unit)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (tick - warmup) / max(unit, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: Any,
    accelerator: Accelerator,
    num_classes: int,
    *,
    channels_last: bool = False,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the whole split, each sample counted exactly once across processes.

    ``normalize`` turns uint8 batches into the model's input on the device (:class:`BatchNormalize`).
    """
    model.eval()
    preds, labels, losses = [], [], []
    for batch in loader:
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
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=np.arange(num_classes), zero_division=0)),
        "num_samples": len(y_true),
    }


def _epoch_loss(accelerator: Accelerator, loss_sum: torch.Tensor, count: int, prior: tuple[float, int]) -> float:
    """Mean train loss of the epoch over all processes, including the batches run before a resume."""
    local = (loss_sum + prior[0] * prior[1]) / max(count + prior[1], 1)
    return accelerator.reduce(local, "mean").item()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams take only scalars and strings."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def published_recipe(recipe: Recipe) -> str:
    """The recipe as YAML for the exported model folder, which travels to the Hub: its local paths (data,
    output, pretrained weights) relative to the working directory or cut to their last two parts, like every
    other published file. The run folder's own recipe.yaml keeps the paths as given."""
    raw = recipe.to_dict()
    raw["data"]["path"] = shareable_path(raw["data"]["path"])
    raw["output_dir"] = shareable_path(raw["output_dir"])
    if raw["model"].get("pretrained_file"):
        raw["model"]["pretrained_file"] = shareable_path(raw["model"]["pretrained_file"])
    return yaml.safe_dump(raw, sort_keys=False)


def train(recipe: str | Path | Recipe, overrides: list[str] | None = None, resume: str | None = None) -> Path:
    """Train the recipe's model; return the run folder (``RUN/best`` holds the exported best model)."""
    started = time.time()
    recipe = load_recipe(recipe, overrides)
    m, d, o, t = recipe.model, recipe.data, recipe.optim, recipe.train
    run_dir = Path(recipe.output_dir)
    if resume is None and list_checkpoints(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints. Continue it with --resume latest, or choose a new "
            f"output_dir (--set output_dir=runs/NEW)."
        )

    # 1. Accelerator: mixed precision (None: from `accelerate launch`/config), accumulation, trackers.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu_ranks_without_gpu()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=o.grad_accum,
        log_with=["tensorboard", JSONLTracker("train", run_dir / LOG_DIR)],
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOG_DIR)),
    )
    if accelerator.num_processes != world_size:
        raise ValueError(
            f"{world_size} processes were launched but Accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); each would train alone. On a CPU-only machine set "
            f"ACCELERATE_USE_CPU=1; otherwise check the accelerate config's distributed_type."
        )
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not t.deterministic
    # Per-process seeds (dropout differs across ranks); DDP broadcasts rank 0's initial weights.
    set_seed(t.seed, device_specific=True, deterministic=t.deterministic)

    # 2. Data: the converted DatasetDict; class names come from its ClassLabel.
    from datasets import load_from_disk

    if not (Path(d.path) / "dataset_dict.json").exists():
        raise FileNotFoundError(
            f"data.path={d.path} is not a dataset written by `derm-accel convert` (no dataset_dict.json). "
            f"Convert your class folders first or fix data.path."
        )
    dataset = load_from_disk(d.path)
    for split in (d.train_split, d.val_split):
        if split not in dataset:
            raise RecipeError(
                f"{d.path} has no '{split}' split (it has {sorted(dataset)}); fix data.train_split/val_split."
            )
    train_split, val_split = dataset[d.train_split], dataset[d.val_split]
    label_names = list(train_split.features["label"].names)

    # 3. Model, and the preprocessing its pretrained config asks for.
    with accelerator.main_process_first():  # one Hub download per machine
        try:
            model = create_model(
                m.name,
                len(label_names),
                pretrained=m.pretrained,
                pretrained_file=m.pretrained_file,
                drop_rate=m.drop_rate,
                drop_path_rate=m.drop_path_rate,
            )
        except TypeError as exc:
            if "drop_path_rate" not in str(exc):
                raise
            raise RecipeError(f"{m.name} has no stochastic depth (drop path); set model.drop_path_rate=0") from exc
    if d.image_size:  # recorded in the exported config, so evaluation and prediction use the same size
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, d.image_size, d.image_size)}
        model.default_cfg = model.pretrained_cfg
    data_cfg = data_config(model)
    size = data_cfg["input_size"][-1]
    loader_options = dict(
        num_workers=d.num_workers,
        pin_memory=d.pin_memory,
        persistent_workers=d.persistent_workers,
        prefetch_factor=d.prefetch_factor,
    )
    train_dl = loaders.train_loader(
        train_split,
        train_transform(data_cfg, d.augment, normalize=False),  # uint8: normalised on the device, per batch
        batch_size=d.batch_size,
        seed=t.seed,
        balance=d.balance,
        min_size=train_decode_size(size, d.augment),
        **loader_options,
    )
    val_transform, val_decode = eval_input(data_cfg)  # uint8 too where timm's eval is resize + centre crop
    val_dl = loaders.eval_loader(
        val_split,
        val_transform,
        batch_size=d.batch_size,
        min_size=decode_size(size, data_cfg.get("crop_pct")),
        decode=val_decode,
        **loader_options,
    )
    normalize = BatchNormalize(data_cfg)
    class_weights = None
    if d.balance == "weighted_loss":
        class_weights = loaders.class_weights(loaders.split_labels(train_split), len(label_names))

    # 4. Optimizer on the plain model; channels_last and compile before prepare.
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, o)
    if t.compile:
        model = torch.compile(model)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    updates_per_epoch = math.ceil(len(train_dl) / o.grad_accum)
    if t.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, t.max_steps_per_epoch)
    ticks = 1 if accelerator.split_batches else accelerator.num_processes
    scheduler = accelerator.prepare(
        build_schedule(
            optimizer.optimizer,
            o,
            updates_per_epoch=updates_per_epoch,
            epochs=t.epochs,
            ticks_per_update=ticks,
        )
    )
    ema = None
    if o.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(accelerator.unwrap_model(model, keep_torch_compile=False), decay=o.ema_decay)
        accelerator.register_for_checkpointing(ema)
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=None if class_weights is None else class_weights.to(accelerator.device),
        label_smoothing=o.label_smoothing,
    )

    # 5. Run folder: resolved recipe, environment, trackers.
    accelerator.init_trackers("train", config=_flat(recipe.to_dict()))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        run_info = collect_run_info(accelerator)
        run_info.update(label_names=label_names, data_config=data_cfg, updates_per_epoch=updates_per_epoch)
        _write_json(run_dir / "run_info.json", json.loads(json.dumps(run_info, default=str)))

    # 6. Resume: weights, optimizer, scheduler, scaler, RNG, EMA, and the position inside the epoch.
    state: dict[str, Any] = {
        "epoch": 0,
        "batches_done": 0,
        "global_step": 0,
        "best_macro_f1": -1.0,
        "best_epoch": None,
        "bad_epochs": 0,
        "train_images": 0,
        "train_seconds": 0.0,
        "wall_seconds": 0.0,
        "history": [],
        "partial_epoch_loss": [0.0, 0],
        # The position inside an epoch and the schedule are counted in per-process batches: a resume must
        # run with the same layout, or it would skip the wrong samples and jump the learning rate.
        "layout": {"num_processes": accelerator.num_processes, "batch_size": d.batch_size, "grad_accum": o.grad_accum},
    }
    last_checkpoint: Path | None = None
    if resume:
        last_checkpoint = resolve_checkpoint(resume, run_dir)
        layout = state["layout"]
        state = load_checkpoint(accelerator, last_checkpoint)
        if state.get("layout", layout) != layout:
            raise RecipeError(
                f"{last_checkpoint} was written with {state['layout']} but this run has {layout}. Resume with "
                f"the same number of processes, data.batch_size and optim.grad_accum, or start a new output_dir."
            )
        accelerator.print(f"Resumed from {last_checkpoint}: epoch {state['epoch'] + 1}, step {state['global_step']}")
        if accelerator.is_main_process:  # steps logged after that checkpoint are run, and logged, again
            accelerator.get_tracker("jsonl").mark_resume(state["global_step"], state["epoch"])
    wall_before = state["wall_seconds"]

    def checkpoint() -> Path:
        state["wall_seconds"] = wall_before + time.time() - started
        return save_checkpoint(accelerator, run_dir, state, keep=t.keep_checkpoints)

    def best_model() -> torch.nn.Module:
        return ema.module if ema is not None else accelerator.unwrap_model(model, keep_torch_compile=False)

    def training_info() -> dict[str, Any]:
        return {
            "epochs_run": state["epoch"],
            "epochs_planned": t.epochs,
            "best_epoch": state["best_epoch"],
            "best_val_macro_f1": state["best_macro_f1"],
            "global_steps": state["global_step"],
            "model": m.name,
            "input_size": list(data_cfg["input_size"]),
            "ema": o.ema,
            "mixed_precision": accelerator.mixed_precision,
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),
            "device_name": device_name(accelerator.device),
            "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9),
            "wall_time_s": wall_before + time.time() - started,
            "dataset_path": shareable_path(d.path),  # published with the model: no absolute local paths
            "dataset_class_names": label_names,
            # The recipe's license, else the one convert recorded for the images (--license).
            "license": recipe.license or train_split.info.license or None,
            "derm_accel_version": derm_accel.__version__,
        }

    # 7. Epochs.
    stopped_early, steps_this_run = False, 0
    for epoch in range(state["epoch"], t.epochs):
        model.train()
        train_dl.set_epoch(epoch)  # reseeds the sampler: the order depends only on (seed, epoch)
        loader = accelerator.skip_first_batches(train_dl, state["batches_done"]) if state["batches_done"] else train_dl
        progress = tqdm(
            total=updates_per_epoch,
            initial=math.ceil(state["batches_done"] / o.grad_accum),
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not accelerator.is_main_process,
        )
        loss_sum, loss_count, images = torch.zeros((), device=accelerator.device), 0, 0
        prior = tuple(state["partial_epoch_loss"])  # (mean, count) of this epoch's batches before a resume
        window_loss, window_count = torch.zeros((), device=accelerator.device), 0
        epoch_start, paused = time.perf_counter(), 0.0
        for batch in loader:
            inputs, labels = normalize(batch["pixel_values"]), batch["labels"]
            if t.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                loss = loss_fn(model(inputs), labels)
                # Every process checks every step, so all stop together before a bad gradient is applied.
                losses = accelerator.gather(loss.detach().float().reshape(1))
                if not torch.isfinite(losses).all().item():
                    progress.close()
                    bad = {rank: value for rank, value in enumerate(losses.tolist()) if not math.isfinite(value)}
                    raise NonFiniteLossError(
                        f"Loss is {bad} (process: value) at epoch {epoch + 1}, "
                        f"batch {state['batches_done'] + 1} (after optimizer step {state['global_step']}). "
                        f"Last good checkpoint: {last_checkpoint or 'none'}. Lower optim.lr, set "
                        f"optim.grad_clip, or use bf16 instead of fp16, then continue with --resume latest."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["batches_done"] += 1
            images += inputs.shape[0]
            loss_sum += loss.detach().float()
            window_loss += loss.detach().float()
            loss_count += 1
            window_count += 1
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=state["global_step"])
            progress.update(1)
            step = state["global_step"]
            if step % t.log_every_steps == 0:
                train_loss = accelerator.reduce(window_loss / window_count, "mean").item()
                lr = scheduler.get_last_lr()[0]
                accelerator.log({"train/loss": train_loss, "train/lr": lr, "epoch": epoch + 1}, step=step)
                progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
                window_loss, window_count = torch.zeros((), device=accelerator.device), 0
            steps_this_run += 1
            if t.max_steps_per_epoch and math.ceil(state["batches_done"] / o.grad_accum) >= t.max_steps_per_epoch:
                if hasattr(loader, "end"):
                    loader.end()  # leaving the loop early: unregister it from Accelerate's gradient state
                break
            stop_now = t.stop_after_steps is not None and steps_this_run >= t.stop_after_steps
            if stop_now or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0):
                pause = time.perf_counter()
                # So that a resumed epoch reports the train loss of all its batches.
                state["partial_epoch_loss"] = [
                    _epoch_loss(accelerator, loss_sum, loss_count, prior),
                    prior[1] + loss_count,
                ]
                last_checkpoint = checkpoint()
                paused += time.perf_counter() - pause
            if stop_now:
                progress.close()
                accelerator.print(f"Stopped after {steps_this_run} steps (train.stop_after_steps); --resume latest")
                accelerator.end_training()
                return run_dir
        progress.close()
        seconds = time.perf_counter() - epoch_start - paused
        epoch_images = images * accelerator.num_processes
        state["train_images"] += epoch_images
        state["train_seconds"] += seconds

        # Validate (EMA weights when EMA is on), log, export the best, checkpoint, maybe stop early.
        eval_model = ema.module if ema is not None else model
        metrics = validate(
            eval_model, val_dl, accelerator, len(label_names), channels_last=t.channels_last, normalize=normalize
        )
        train_loss = _epoch_loss(accelerator, loss_sum, loss_count, prior)
        record = {
            "epoch": epoch + 1,
            "train/loss_epoch": train_loss,
            "train/lr": scheduler.get_last_lr()[0],
            "train/images_per_s": epoch_images / max(seconds, 1e-9),
            **{f"val/{k}": v for k, v in metrics.items()},
        }
        accelerator.log(record, step=state["global_step"])
        accelerator.print(
            f"epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {metrics['loss']:.4f}, "
            f"acc {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
            f"{record['train/images_per_s']:.1f} img/s"
        )
        state["history"].append(record)
        state["epoch"], state["batches_done"], state["partial_epoch_loss"] = epoch + 1, 0, [0.0, 0]
        if metrics["macro_f1"] > state["best_macro_f1"]:
            state["best_macro_f1"], state["best_epoch"], state["bad_epochs"] = (
                metrics["macro_f1"],
                epoch + 1,
                0,
            )
            if accelerator.is_main_process:
                val_metrics = {"split": d.val_split, "epoch": epoch + 1, **metrics}
                export_model(
                    best_model(),
                    run_dir / BEST_DIR,
                    label_names,
                    extra_files={
                        "recipe.yaml": published_recipe(recipe),
                        "val_metrics.json": json.dumps(val_metrics, indent=2) + "\n",
                        "training_info.json": json.dumps(training_info(), indent=2) + "\n",
                    },
                )
        else:
            state["bad_epochs"] += 1
        last_checkpoint = checkpoint()
        if t.early_stopping_patience and state["bad_epochs"] >= t.early_stopping_patience:
            accelerator.print(
                f"Early stopping: no better val macro-F1 for {state['bad_epochs']} epochs "
                f"(best {state['best_macro_f1']:.4f} at epoch {state['best_epoch']})."
            )
            stopped_early = True
            break
        if t.stop_after_steps is not None and steps_this_run >= t.stop_after_steps and epoch + 1 < t.epochs:
            accelerator.print(f"Stopped after {steps_this_run} steps (train.stop_after_steps); --resume latest")
            break

    # 8. Final bookkeeping: the best model's training_info covers the whole run.
    if accelerator.is_main_process and (run_dir / BEST_DIR).is_dir():
        info = training_info()
        info["stopped_early"] = stopped_early
        _write_json(run_dir / BEST_DIR / "training_info.json", info)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
