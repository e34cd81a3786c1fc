"""Process-group set-up shared by the stages that run under ``accelerate launch`` (train, evaluate)."""

from __future__ import annotations

import os

import torch


def has_accelerator_device() -> bool:
    """True where a GPU (CUDA, XPU or MPS) is present."""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


def use_cpu_ranks_without_gpu() -> None:
    """Make a multi-process launch on a GPU-less machine form one gloo group instead of N lone processes.

    ``accelerate launch`` with a MULTI_GPU config does not export ``use_cpu``, so without
    ``ACCELERATE_USE_CPU=1`` each CPU process would run alone (see accelerate_configs/cpu_2proc.yaml).
    Call before creating the Accelerator.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator_device():
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
