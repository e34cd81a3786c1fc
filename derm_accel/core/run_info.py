"""What a run ran on: package versions, git commit, hardware and the Accelerate setup.

Written to ``RUN/run_info.json`` so a result can be traced back to code and environment months later.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "derm-accel",
    "torch",
    "torchvision",
    "timm",
    "accelerate",
    "datasets",
    "safetensors",
    "numpy",
    "pillow",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_info(path: str | Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the checkout holding ``path`` (default: this package); None outside git."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def device_name(device: torch.device) -> str:
    """A human name for the training device, e.g. 'NVIDIA A100-SXM4-80GB' or 'CPU (x86_64)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({platform.machine() or 'unknown'})"


def accelerate_state(accelerator: Any) -> dict[str, Any]:
    return {
        "distributed_type": str(accelerator.distributed_type.value),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "device_name": device_name(accelerator.device),
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
    }


def collect_run_info(accelerator: Any) -> dict[str, Any]:
    return {
        "command": sys.argv,
        "hostname": platform.node(),
        "versions": package_versions(),
        "git": git_info(),
        "accelerate": accelerate_state(accelerator),
    }
