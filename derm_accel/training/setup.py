"""Everything a training run is built from before its first step: accelerator, trackers, data, model, optimizer,
schedule, loss, EMA, and the state of a resumed run.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from torch.optim.lr_scheduler import LambdaLR

from derm_accel.core.distributed import (
    start_rank_monitor,
    use_cpu_ranks_without_gpu,
)
from derm_accel.core.paths import shareable_path
from derm_accel.core.tracking import JSONLTracker
from derm_accel.data import loaders
from derm_accel.data.color import color_constancy_spec
from derm_accel.data.selection import is_converted, load_converted
from derm_accel.data.trained_rows import row_ids
from derm_accel.data.transforms import BatchNormalize, decode_size, eval_input, train_decode_size, train_transform
from derm_accel.models.build import create_model, data_config
from derm_accel.training.checkpoints import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    read_recipe,
    read_state,
    set_aside_later_checkpoints,
    verified_checkpoint,
)
from derm_accel.training.config import DataConfig, OptimConfig, Recipe, RecipeError, load_recipe
from derm_accel.training.resume import apply_hyperparameters, check_changes, hyperparameters, recipe_changes

BEST_DIR = "best"



LOG_DIR = "logs"



def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW through timm, with no weight decay on norm layers and biases, and ``optim.layer_decay``.

    timm's layer-decay groups carry an ``lr_scale`` that only timm's schedulers apply; it is folded into each
    group's learning rate here, so :func:`build_schedule` scales the per-layer rates as it does a single one.
    """
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(
        model,
        opt=cfg.name,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        filter_bias_and_bn=True,
        layer_decay=cfg.layer_decay,
    )
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group.pop("lr_scale", 1.0)
    return optimizer



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



def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams take only scalars and strings."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out



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



@dataclass
class Run:
    """What :func:`setup` builds for one invocation of :func:`train`; the epoch functions only read it, apart
    from the last three fields (this invocation's bookkeeping, never saved)."""

    recipe: Recipe
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # prepared: DDP-wrapped and compiled where asked
    optimizer: Any
    scheduler: Any
    train_dl: Any
    val_dl: Any
    normalize: BatchNormalize  # uint8 batches to the model's input, on the device
    loss_fn: torch.nn.Module
    mixup: Any | None  # timm Mixup when data.augment.mixup/cutmix (its loss: SoftTargetCrossEntropy)
    ema: Any | None  # timm ModelEmaV3 when optim.ema
    label_names: list[str]
    data_cfg: dict[str, Any]
    updates_per_epoch: int
    dataset_license: str | None  # the one convert recorded for the images
    training_rows: list[str] = field(default_factory=list)  # ids of the training split's images
    clock: float = 0.0  # time.time() up to which wall time is counted in TrainState.wall_seconds
    first_step: int = 0  # the optimizer step this invocation started from
    last_checkpoint: Path | None = None

    def eval_model(self) -> torch.nn.Module:
        """The model validated and exported: the EMA when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def export_model(self) -> torch.nn.Module:
        """The model exported: the EMA, or the prepared model without its DDP and compile wrappers."""
        if self.ema is not None:
            return self.ema.module
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)



def setup(recipe: Recipe, resume: str | None = None) -> Run:
    """Build the Accelerator, data, model, optimizer, schedule, EMA and loss, and ``prepare`` them; writes nothing."""
    started = time.time()
    d, o, t = recipe.data, recipe.optim, recipe.train
    run_dir = Path(recipe.output_dir)
    if resume is None and list_checkpoints(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints. Continue it with --resume latest, or choose a new "
            f"output_dir (--set output_dir=runs/NEW)."
        )
    accelerator = build_accelerator(recipe, run_dir)
    train_split, val_split = load_splits(d)
    label_names = list(train_split.features["label"].names)
    with accelerator.main_process_first():  # one Hub download per machine
        model = build_model(recipe, len(label_names))
    data_cfg = data_config(model)
    train_dl, val_dl = build_loaders(recipe, data_cfg, train_split, val_split)
    # Optimizer on the plain model; channels_last and compile before prepare.
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
    schedule = build_schedule(
        optimizer.optimizer, o, updates_per_epoch=updates_per_epoch, epochs=t.epochs, ticks_per_update=ticks
    )
    return Run(
        recipe=recipe,
        run_dir=run_dir,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=accelerator.prepare(schedule),
        train_dl=train_dl,
        val_dl=val_dl,
        normalize=BatchNormalize(data_cfg),
        loss_fn=build_loss(recipe, train_split, len(label_names), accelerator.device),
        mixup=build_mixup(recipe, len(label_names)),
        ema=build_ema(accelerator, model, o),
        label_names=label_names,
        data_cfg=data_cfg,
        updates_per_epoch=updates_per_epoch,
        dataset_license=train_split.info.license or None,
        training_rows=row_ids(train_split),
        clock=started,
    )



def build_trackers(recipe: Recipe, run_dir: Path) -> list[Any]:
    """The recipe's trackers (``train.log_with``: tensorboard, trackio, wandb, mlflow...) for looking at curves;
    ``logs/metrics.jsonl`` for programs, always."""
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [name for name in recipe.train.log_with if name not in available]
    if missing:
        raise RecipeError(
            f"train.log_with names {missing}, not installed here: pip install {' '.join(missing)}, or drop it "
            f"(e.g. --set train.log_with=[tensorboard])."
        )
    return [*recipe.train.log_with, JSONLTracker("train", run_dir / LOG_DIR)]



def build_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    """Mixed precision (None: from ``accelerate launch``/config), accumulation, trackers; seeds every process."""
    t = recipe.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu_ranks_without_gpu()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=recipe.optim.grad_accum,
        log_with=build_trackers(recipe, run_dir),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOG_DIR)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.dist_timeout_s))],
    )
    start_rank_monitor(t.dist_timeout_s)
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
    return accelerator



def load_splits(d: DataConfig) -> tuple[Any, Any]:
    """The train and validation splits of the converted DatasetDict at ``data.path``."""
    if not is_converted(d.path):
        raise FileNotFoundError(
            f"data.path={d.path} is not a dataset written by `derm-accel convert` (no dataset_dict.json). "
            f"Convert your class folders first or fix data.path."
        )
    dataset = load_converted(d.path)  # or a k-fold index selection of one
    for split in (d.train_split, d.val_split):
        if split not in dataset:
            raise RecipeError(
                f"{d.path} has no '{split}' split (it has {sorted(dataset)}); fix data.train_split/val_split."
            )
    return dataset[d.train_split], dataset[d.val_split]



def recipe_color_constancy(recipe: Recipe) -> dict[str, Any] | None:
    """The recipe's colour constancy as config.json records it, or None."""
    return color_constancy_spec(recipe.data.color_constancy, recipe.data.color_constancy_power)


def build_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The recipe's timm model; ``data.image_size`` is recorded in its config, so evaluation and prediction
    use the same size."""
    m, size = recipe.model, recipe.data.image_size
    try:
        model = create_model(
            m.name,
            num_classes,
            pretrained=m.pretrained,
            pretrained_file=m.pretrained_file,
            drop_rate=m.drop_rate,
            drop_path_rate=m.drop_path_rate,
        )
    except TypeError as exc:
        if "drop_path_rate" not in str(exc):
            raise
        raise RecipeError(f"{m.name} has no stochastic depth (drop path); set model.drop_path_rate=0") from exc
    if size:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
        model.default_cfg = model.pretrained_cfg
    # data_config(model) carries it into every transform of the run; export_best writes it to config.json
    model.color_constancy = recipe_color_constancy(recipe)
    return model



def build_loaders(recipe: Recipe, data_cfg: dict[str, Any], train_split: Any, val_split: Any) -> tuple[Any, Any]:
    """Train and validation loaders yielding uint8 batches (normalised on the device by :class:`BatchNormalize`)."""
    d, size = recipe.data, data_cfg["input_size"][-1]
    options = dict(
        num_workers=d.num_workers,
        pin_memory=d.pin_memory,
        persistent_workers=d.persistent_workers,
        prefetch_factor=d.prefetch_factor,
    )
    train_dl = loaders.train_loader(
        train_split,
        train_transform(data_cfg, d.augment, normalize=False),
        batch_size=d.batch_size,
        seed=recipe.train.seed,
        balance=d.balance,
        min_size=train_decode_size(size, d.augment),
        **options,
    )
    val_transform, val_decode = eval_input(data_cfg)  # uint8 too where timm's eval is resize + centre crop
    val_dl = loaders.eval_loader(
        val_split,
        val_transform,
        batch_size=d.batch_size,
        min_size=decode_size(size, data_cfg.get("crop_pct")),
        decode=val_decode,
        **options,
    )
    return train_dl, val_dl



def build_loss(recipe: Recipe, train_split: Any, num_classes: int, device: torch.device) -> torch.nn.Module:
    """Cross-entropy with label smoothing, weighted by inverse class frequency for ``data.balance=weighted_loss``."""
    weight = None
    if recipe.data.balance == "weighted_loss":
        weight = loaders.class_weights(loaders.split_labels(train_split), num_classes).to(device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.optim.label_smoothing)



def build_mixup(recipe: Recipe, num_classes: int) -> Any | None:
    """timm's Mixup/CutMix for ``data.augment.mixup``/``cutmix`` (label smoothing folded into its soft targets)."""
    a = recipe.data.augment
    if not (a.mixup or a.cutmix):
        return None
    from timm.data import Mixup

    smoothing = recipe.optim.label_smoothing
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=smoothing, num_classes=num_classes)



def build_ema(accelerator: Accelerator, model: torch.nn.Module, o: OptimConfig) -> Any | None:
    """timm's ModelEmaV3 of the plain model, saved with every checkpoint; None without ``optim.ema``."""
    if not o.ema:
        return None
    from timm.utils import ModelEmaV3

    # Saved with every checkpoint as ema.safetensors (not registered with Accelerate, which would pickle it).
    return ModelEmaV3(accelerator.unwrap_model(model, keep_torch_compile=False), decay=o.ema_decay)



def resume_checks(
    recipe: Recipe, resume: str | None, allow_changes: bool
) -> tuple[Path | None, dict[str, dict[str, tuple[Any, Any]]]]:
    """The verified checkpoint to resume from and the recipe changes it accepts ({"resumable": ..., "forced":
    ...}); raises before anything is built or written when a change is not allowed."""
    if not resume:
        return None, {}
    main = os.environ.get("RANK", "0") == "0"
    checkpoint = verified_checkpoint(resume, recipe.output_dir, say=print if main else lambda *_: None)
    saved = read_recipe(checkpoint)
    if saved is None:
        return checkpoint, {}
    with contextlib.suppress(RecipeError):  # keys an earlier version lacked take their defaults, as they did then
        saved = load_recipe(saved).to_dict()
    resumable, forced = check_changes(recipe_changes(saved, recipe.to_dict()), checkpoint, allow=allow_changes)
    return checkpoint, {"resumable": resumable, "forced": forced}



def resume_state(
    run: Run, checkpoint: Path | None, changes: dict[str, dict[str, tuple[Any, Any]]] | None = None
) -> TrainState:
    """A fresh state, or the one in ``checkpoint`` (from :func:`resume_checks`), with weights, optimizer,
    scheduler, scaler, RNG and EMA restored and the position inside the epoch; the recipe's changes applied."""
    acc, d, o = run.accelerator, run.recipe.data, run.recipe.optim
    layout = {"num_processes": acc.num_processes, "batch_size": d.batch_size, "grad_accum": o.grad_accum}
    if checkpoint is None:
        return TrainState(layout=layout)
    saved = read_state(checkpoint)
    if saved.layout and saved.layout != layout:
        raise RecipeError(
            f"{checkpoint} was written with {saved.layout} but this run has {layout}. Resume with "
            f"the same number of processes, data.batch_size and optim.grad_accum, or start a new output_dir."
        )
    wanted = hyperparameters(run.optimizer)  # the recipe's; loading the optimizer state overwrites them
    state = load_checkpoint(acc, checkpoint, ema=run.ema)
    state.layout = layout
    run.first_step, run.last_checkpoint = state.global_step, checkpoint
    acc.print(f"Resumed from {checkpoint}: epoch {state.epoch + 1}, step {state.global_step}")
    acc.wait_for_everyone()  # every process has read the checkpoints before later ones are moved
    if acc.is_main_process:
        for moved in set_aside_later_checkpoints(run.run_dir, checkpoint):
            acc.print(f"Set aside {moved.name}: written after {checkpoint.name}, it is not part of this timeline")
    acc.wait_for_everyone()
    for kind, found in (changes or {}).items():
        if found:
            state.recipe_changes.append(
                {"step": state.global_step, "epoch": state.epoch, "kind": kind, "changes": found}
            )
            what = "changed on resume" if kind == "resumable" else "changed by --resume-with-changes"
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in found.items())
            acc.print(f"{what} at step {state.global_step}: {listed}")
    if any((changes or {}).values()):
        apply_hyperparameters(run.optimizer.optimizer, run.scheduler.scheduler, wanted)
    return state

