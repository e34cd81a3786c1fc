"""Training recipes: typed dataclasses loaded from YAML, with ``--set key=value`` overrides.

A recipe is the whole description of a run. Every value is checked on load, so a typo or an impossible value
fails in a second with the key and the fix, not an hour into a GPU job. The resolved recipe is written beside
every run and every exported model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from derm_accel.core.errors import InputError
from derm_accel.data.color import DEFAULT_POWER, color_constancy_spec
from derm_accel.data.transforms import AugmentConfig

BALANCE_MODES = ("none", "weighted_loss", "sampler")
MIXED_PRECISION = (None, "no", "fp16", "bf16")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")
# The trackers the installed Accelerate integrates, from its own registry (a newer Accelerate brings new ones);
# each needs its own package.
TRACKERS = tuple(sorted(str(name) for name in LOGGER_TYPE_TO_CLASS))


class RecipeError(InputError):
    """A recipe key is unknown, has the wrong type, or holds an impossible value."""


@dataclass
class ModelConfig:
    name: str = "efficientnet_b3"
    pretrained: bool = False  # timm's ImageNet weights through the Hub
    pretrained_file: str | None = None  # local timm-layout folder (air-gapped sites)
    drop_rate: float = 0.3
    drop_path_rate: float = 0.2
    # Test-time augmentation the exported model answers with by default (evaluate, predict, serve, demo):
    # null (single view) or flip (original + horizontal + vertical flip, softmax averaged). derm_accel.tta.
    tta: str | None = None


@dataclass
class DataConfig:
    path: str = "data/derm"
    train_split: str = "train"
    val_split: str = "validation"
    batch_size: int = 64  # per process
    num_workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4
    balance: str = "none"  # none | weighted_loss | sampler
    image_size: int | None = None  # None: the model's default input size
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Colour constancy on every image before anything else (derm_accel.data.color): null or shades_of_gray,
    # with its Minkowski power (6 as in Barata et al. 2015). Recorded in config.json (derm_accel.color_constancy),
    # so evaluate, predict, serve, the demo and the ONNX export apply it too.
    color_constancy: str | None = None
    color_constancy_power: float = DEFAULT_POWER


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw
    lr: float = 1.0e-3
    weight_decay: float = 0.05  # never applied to norm layers and biases
    schedule: str = "cosine"  # cosine (with linear warmup) | constant
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0  # max gradient norm; null or 0 disables
    grad_accum: int = 1
    ema: bool = False
    ema_decay: float = 0.9998
    # Layer-wise learning-rate decay (timm's param_groups_layer_decay): the head trains at lr, each block
    # below it at layer_decay times the one above. null: one learning rate for every layer.
    layer_decay: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 5
    mixed_precision: str | None = None  # None: from the accelerate config / launch flags
    channels_last: bool = True
    compile: bool = False
    seed: int = 42
    deterministic: bool = False
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0  # epochs without a better val macro-F1; 0 disables
    max_steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (smoke runs)
    stop_after_steps: int | None = None  # end this invocation after N optimizer steps (e.g. a job time limit)
    log_every_steps: int = 10
    # Process-group timeout: a rank that stops answering (hung, or its machine gone silent) stops the others
    # after this long, with an error naming it, instead of the 30-minute default.
    dist_timeout_s: float = 600.0
    # Experiment trackers Accelerate logs to (TRACKERS); logs/metrics.jsonl is always written as well.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class GuardConfig:
    enabled: bool = True  # fit a domain guard on the training split when training ends
    in_domain_share: float = 0.95  # share of held-out in-domain images the ood_score threshold lets pass
    # Abstention (selective prediction), set on the validation split: answer the target_coverage most confident
    # share of in-domain images; or, when target_error is set, as many as keep their error at or under it.
    target_coverage: float = 0.8
    target_error: float | None = None
    max_fit_images: int = 5000  # the Gaussians are fitted on a seeded, class-stratified sample of this many


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    output_dir: str = "runs/effnet_b3"
    license: str | None = None  # license of the trained weights, recorded for the model card

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_recipe(source: str | os.PathLike | Recipe | dict | None = None, overrides: list[str] | None = None) -> Recipe:
    """A validated :class:`Recipe` from a YAML file (or dict, or Recipe) plus ``key=value`` overrides."""
    where = "recipe"
    if isinstance(source, Recipe):
        raw: dict[str, Any] = source.to_dict()
    elif isinstance(source, dict):
        raw = _plain(source)
    elif source is None:
        raw = {}
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Recipe {path} does not exist. See recipes/ for examples (e.g. recipes/smoke.yaml)."
            )
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise RecipeError(f"{path} must hold a mapping (model:, data:, optim:, train:, ...).")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    recipe = _build(Recipe, raw, prefix="", where=where)
    validate(recipe)
    return recipe


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``; the value is read as YAML (lists, null, true)."""
    if "=" not in item:
        raise RecipeError(f"Override '{item}' must look like key=value, e.g. --set optim.lr=3e-4")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError(f"Override '{item}' has no key; use e.g. --set data.batch_size=32")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"Override '{item}': the value is not valid YAML ({exc})") from exc
    return key, value


def _set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"Override {key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, *, prefix: str, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: '{prefix.rstrip('.')}' must be a section (a mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise RecipeError(
            f"{where}: unknown key '{prefix}{key}'.{hint} Valid keys here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {name: _coerce(hints[name], raw[name], f"{prefix}{name}", where) for name in names if name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """Turn a YAML value into the field's type, or fail naming the key and the type expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", where=where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where}: {key} must be a list of {len(args)} numbers, e.g. [0.35, 1.0]; got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value  # --set train.log_with=wandb: a list of one
        if not isinstance(items, (list, tuple)):
            raise RecipeError(f"{where}: {key} must be a list, e.g. [tensorboard, mlflow]; got {value!r}")
        return [_coerce(arg, v, f"{key}[{i}]", where) for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise RecipeError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"{where}: {key} must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise RecipeError(f"{where}: {key} must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise RecipeError(f"{where}: {key} must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: {key} must be a number, got {value!r}")
        try:
            return float(value)  # also accepts "1e-3", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: {key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` (e.g. mixed_precision: no) as False
            return "yes" if value else "no"
        if isinstance(value, (dict, list)) or value is None:
            raise RecipeError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def validate(recipe: Recipe) -> None:
    """Check values that have the right type but cannot work; each error names the key and the fix."""
    m, d, o, t = recipe.model, recipe.data, recipe.optim, recipe.train

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise RecipeError(message)

    need(bool(m.name), "model.name is empty; set a timm architecture, e.g. model.name=efficientnet_b3")
    need(
        not (m.pretrained and m.pretrained_file),
        "model.pretrained and model.pretrained_file are both set; use pretrained: true for timm's Hub "
        "weights or pretrained_file: PATH for a local copy, not both",
    )
    need(0 <= m.drop_rate < 1, f"model.drop_rate must be in [0, 1), got {m.drop_rate}")
    need(0 <= m.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    need(m.tta in (None, "flip"), f"model.tta must be null (single view) or flip, got {m.tta!r}")
    need(bool(d.path), "data.path is empty; point it at a dataset written by `derm-accel convert`")
    g = recipe.guard
    need(
        0.5 <= g.in_domain_share < 1,
        f"guard.in_domain_share is the share of in-domain images that pass, in [0.5, 1); got {g.in_domain_share}",
    )
    need(
        g.target_error is None or 0 < g.target_error < 1,
        f"guard.target_error is an error rate in (0, 1), or null for the coverage rule; got {g.target_error}",
    )
    need(0 < g.target_coverage <= 1, f"guard.target_coverage is a share in (0, 1], got {g.target_coverage}")
    need(g.max_fit_images >= 20, f"guard.max_fit_images must be at least 20, got {g.max_fit_images}")
    need(d.batch_size >= 1, f"data.batch_size must be at least 1, got {d.batch_size}")
    need(d.num_workers >= 0, f"data.num_workers must be 0 or more, got {d.num_workers}")
    need(d.prefetch_factor >= 1, f"data.prefetch_factor must be at least 1, got {d.prefetch_factor}")
    need(
        d.balance in BALANCE_MODES,
        f"data.balance must be one of {', '.join(BALANCE_MODES)}; got '{d.balance}'",
    )
    need(
        d.image_size is None or d.image_size >= 16,
        f"data.image_size must be null or >= 16, got {d.image_size}",
    )
    try:
        color_constancy_spec(d.color_constancy, d.color_constancy_power, where="data.color_constancy")
    except InputError as exc:
        raise RecipeError(f"{exc} (data.color_constancy_power sets the power)") from exc
    a = d.augment
    need(
        0 < a.scale[0] <= a.scale[1] <= 1,
        f"data.augment.scale must satisfy 0 < min <= max <= 1, got {list(a.scale)}",
    )
    need(0 < a.ratio[0] <= a.ratio[1], f"data.augment.ratio must satisfy 0 < min <= max, got {list(a.ratio)}")
    for name in ("hflip", "vflip"):
        need(
            0 <= getattr(a, name) <= 1,
            f"data.augment.{name} is a probability in [0, 1], got {getattr(a, name)}",
        )
    need(a.rotation >= 0, f"data.augment.rotation is in degrees and must be >= 0, got {a.rotation}")
    need(a.color_jitter >= 0, f"data.augment.color_jitter must be >= 0, got {a.color_jitter}")
    need(
        a.auto_augment in (None, "trivialaugment", "randaugment"),
        f"data.augment.auto_augment must be null, trivialaugment or randaugment; got {a.auto_augment!r}",
    )
    need(a.mixup >= 0 and a.cutmix >= 0, f"data.augment.mixup/cutmix are Beta alphas >= 0, got {a.mixup}/{a.cutmix}")
    if a.mixup or a.cutmix:
        need(
            d.batch_size % 2 == 0,
            f"data.augment.mixup/cutmix pair the images of a batch: data.batch_size must be even, got {d.batch_size}",
        )
        need(
            d.balance != "weighted_loss",
            "data.augment.mixup/cutmix train on mixed soft labels, which a class-weighted loss cannot weigh; use "
            "data.balance=sampler or none",
        )
    need(o.name in OPTIMIZERS, f"optim.name must be one of {', '.join(OPTIMIZERS)}; got '{o.name}'")
    need(o.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}; got '{o.schedule}'")
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    need(0 <= o.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    need(o.grad_clip is None or o.grad_clip >= 0, f"optim.grad_clip must be null or >= 0, got {o.grad_clip}")
    need(o.grad_accum >= 1, f"optim.grad_accum must be at least 1, got {o.grad_accum}")
    need(
        o.layer_decay is None or 0 < o.layer_decay <= 1,
        f"optim.layer_decay must be null or in (0, 1], e.g. 0.85; got {o.layer_decay}",
    )
    need(0 < o.ema_decay < 1, f"optim.ema_decay must be in (0, 1), e.g. 0.9998; got {o.ema_decay}")
    need(t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}")
    need(
        t.mixed_precision in MIXED_PRECISION,
        f"train.mixed_precision must be null (take it from accelerate), no, fp16 or bf16; got '{t.mixed_precision}'",
    )
    need(
        t.checkpoint_every_steps >= 0,
        f"train.checkpoint_every_steps must be >= 0, got {t.checkpoint_every_steps}",
    )
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be at least 1, got {t.keep_checkpoints}")
    need(
        t.early_stopping_patience >= 0,
        f"train.early_stopping_patience must be >= 0, got {t.early_stopping_patience}",
    )
    need(
        t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1,
        f"train.max_steps_per_epoch must be null or >= 1, got {t.max_steps_per_epoch}",
    )
    need(
        t.stop_after_steps is None or t.stop_after_steps >= 1,
        f"train.stop_after_steps must be null or >= 1, got {t.stop_after_steps}",
    )
    need(t.log_every_steps >= 1, f"train.log_every_steps must be at least 1, got {t.log_every_steps}")
    need(t.dist_timeout_s > 0, f"train.dist_timeout_s is in seconds and must be > 0, got {t.dist_timeout_s}")
    unknown = [name for name in t.log_with if name not in TRACKERS]
    need(
        not unknown,
        f"train.log_with: unknown tracker {unknown}; choose from {', '.join(TRACKERS)} (a list; [] for none "
        "besides logs/metrics.jsonl, which is always written)",
    )
    need(bool(recipe.output_dir), "output_dir is empty; set where runs go, e.g. output_dir=runs/effnet_b3")
