"""The files of a checkpoint, read and written without unpickling anything.

A checkpoint is a folder that people copy between machines and download, so nothing in it may run code
when it is read. Weights (model, EMA) are safetensors; optimizer, scheduler and gradient-scaler states go
through ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers; the random
number generator states of each process are tensors in ``rng_state_<rank>.safetensors`` with the scalars in
its metadata (Accelerate's ``random_states_<rank>.pkl`` is a pickle, so it is never written or read).

``manifest.json`` lists every file with its size and sha256; it is written last, before the folder is
renamed into place, and :func:`verify_checkpoint` checks it before anything is loaded, so a truncated or
altered file is named instead of half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from derm_accel.core.errors import InputError
from derm_accel.core.fileio import atomic_write_json

MANIFEST_NAME = "manifest.json"
EMA_NAME = "ema.safetensors"
RECIPE_NAME = "recipe.json"
# What Accelerate's save_state pickles (RNG states, registered objects, seedable samplers): removed after it.
ACCELERATE_PICKLES = ("random_states_*.pkl", "custom_checkpoint_*.pkl", "sampler*.bin", "dl_state_dict*.bin")


class CheckpointError(InputError):
    """A checkpoint file is missing, altered, truncated or cannot be loaded; the message names it."""


def rng_name(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


# --- random number generators -----------------------------------------------------------------------------------


def save_rng_state(path: Path, accelerator_step: int) -> None:
    """This process's Python, NumPy, torch CPU and CUDA generator states, and Accelerate's step counter."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).astype(np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    scalars = {
        "python_version": version,
        "python_gauss": gauss,
        "numpy_name": np_name,
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "accelerator_step": int(accelerator_step),
    }
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})


def restore_rng_state(path: Path) -> int:
    """Restore what :func:`save_rng_state` saved; returns Accelerate's step counter."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
    random.setstate((scalars["python_version"], tuple(tensors["python"].tolist()), scalars["python_gauss"]))
    np.random.set_state(
        (
            scalars["numpy_name"],
            tensors["numpy"].numpy().astype(np.uint32),
            scalars["numpy_pos"],
            scalars["numpy_has_gauss"],
            scalars["numpy_gauss"],
        )
    )
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return int(scalars["accelerator_step"])


# --- manifest ---------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """List every file of ``folder`` with its size and sha256 (atomically: the manifest is whole or absent)."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    atomic_write_json(folder / MANIFEST_NAME, {"format": 1, "files": files})


def verify_checkpoint(folder: Path) -> list[str]:
    """Check every file against ``manifest.json``; raise :class:`CheckpointError` naming the first bad one.

    Returns the names of files the manifest does not list (never read, reported by the caller).
    """
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{manifest_path} is missing: the checkpoint is incomplete or was written by a derm-accel without "
            f"checkpoint manifests. Resume from another checkpoint, or start a new output_dir."
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is not a valid checkpoint manifest ({e}).") from e
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (listed in {MANIFEST_NAME}).")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{path} has {size} bytes, the manifest says {expected['size']}: truncated or altered."
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {MANIFEST_NAME}: the file was altered.")
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(folder).as_posix() not in files
    )


# --- loading, each failure naming its file ------------------------------------------------------------------------


def load_tensors_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be loaded safely ({type(e).__name__}: {e}).") from e


def load_module_file(module: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into ``module`` with a strict key check."""
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {e}).") from e
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}. "
            f"Was it written for another model.name?"
        )


def save_module_file(module: torch.nn.Module, path: Path) -> None:
    save_model(module, str(path))


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN or inf."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]
