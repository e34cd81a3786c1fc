"""What may change between a checkpoint and the recipe it is resumed with.

A resumed run continues the optimizer, schedule and data order where they stopped, so most settings cannot
change silently: a new learning rate would be overwritten by the optimizer state, a new model or dataset
would not fit. Settings that only say how long to train, how often to checkpoint or log, when to stop, or
how to feed the data (same batches either way) may change; they are applied and named. Every other change
is refused with the list of keys, unless the user asks for it (``--resume-with-changes``): then it is
applied (optimizer hyperparameters included), logged, and recorded in the run's history.
"""

from __future__ import annotations

from typing import Any

from derm_accel.training.config import RecipeError

# Keys that may change on resume without changing what the run computes step by step.
RESUMABLE_KEYS = frozenset(
    {
        "train.epochs",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "train.log_every_steps",
        "train.dist_timeout_s",
        "train.early_stopping_patience",
        "train.stop_after_steps",
        "train.compile",
        "train.channels_last",
        "data.num_workers",
        "data.pin_memory",
        "data.persistent_workers",
        "data.prefetch_factor",
        "output_dir",
        "license",
    }
)
RESUMABLE_PREFIXES = ("guard.",)  # used only after training ends
# The position inside an epoch is counted in per-process batches: these can never change on resume.
LAYOUT_KEYS = frozenset({"data.batch_size", "optim.grad_accum"})
# They decide the optimizer's parameter groups, whose saved state a resume restores group by group.
GROUP_KEYS = frozenset({"optim.layer_decay", "optim.name"})
OPTIMIZER_HYPERPARAMETERS = ("lr", "initial_lr", "weight_decay", "betas", "eps", "momentum")


def flat(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists and tuples compared as lists)."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def recipe_changes(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs: ``{key: (saved, given)}``."""
    old, new = flat(saved), flat(given)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def is_resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES)


def check_changes(
    changes: dict[str, tuple[Any, Any]], checkpoint: Any, *, allow: bool
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Split ``changes`` into (resumable, forced); raise ``RecipeError`` for changes that are not allowed."""
    resumable = {k: v for k, v in changes.items() if is_resumable(k)}
    forced = {k: v for k, v in changes.items() if not is_resumable(k)}
    for keys, why in (
        (
            LAYOUT_KEYS,
            ". Resume with the same number of processes, data.batch_size and optim.grad_accum (they fix the "
            "position inside an epoch), or start a new output_dir.",
        ),
        (
            GROUP_KEYS,
            ": these shape the optimizer's parameter groups and state, which a resume restores as saved. Keep "
            "them, or start a new output_dir.",
        ),
    ):
        fixed = sorted(k for k in forced if k in keys)
        if fixed:
            raise RecipeError(f"{checkpoint} was written with {_describe({k: forced[k] for k in fixed})}{why}")
    if forced and not allow:
        raise RecipeError(
            f"The recipe differs from the one {checkpoint} was trained with in {len(forced)} settings that a "
            f"resume cannot take silently: {_describe(forced)}. Undo those --set/recipe changes to continue the "
            f"run as it was, or pass --resume-with-changes to apply them from this step on (recorded in "
            f"run_info.json). Changeable on resume: {', '.join(sorted(RESUMABLE_KEYS))}, guard.*."
        )
    return resumable, forced


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changes.items())


def hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """The optimizer's per-group hyperparameters (what a checkpoint's optimizer state would overwrite)."""
    return [{k: g[k] for k in OPTIMIZER_HYPERPARAMETERS if k in g} for g in optimizer.param_groups]


def apply_hyperparameters(optimizer: Any, scheduler: Any, groups: list[dict[str, Any]]) -> None:
    """Put the recipe's hyperparameters back after a checkpoint's optimizer state was loaded, and restart
    the (new) schedule from the restored position with the recipe's base learning rate."""
    for group, wanted in zip(optimizer.param_groups, groups, strict=True):
        group.update(wanted)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
