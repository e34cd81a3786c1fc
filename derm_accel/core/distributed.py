"""Process-group set-up shared by the stages that run under ``accelerate launch`` (train, evaluate)."""

from __future__ import annotations

import contextlib
import os

import torch

from derm_accel.core.errors import RunError


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


# --- a rank that is lost or hangs -------------------------------------------------------------------------------

_monitor: dict[str, object] = {}  # the gloo group used to find which ranks are gone, and its timeout


class LostRankError(RunError):
    """A process of the group died or stopped answering; the message names it and how to go on."""


def start_rank_monitor(timeout_s: float) -> None:
    """Create the gloo group that :func:`lost_ranks` uses (every rank must call this once, after the process
    group exists). A separate group, so it works under NCCL too and is not in the failed collective's state."""
    import datetime

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    timeout = datetime.timedelta(seconds=min(timeout_s, 60.0))
    _monitor.update(group=dist.new_group(backend="gloo", timeout=timeout), timeout=timeout)


def lost_ranks() -> tuple[list[int], str]:
    """After a failed collective: the ranks that are gone, as far as this rank can tell, and how it was found.

    Rank 0 waits for a token from every other rank on the monitor group (each wait bounded by its timeout):
    the ranks whose token does not come are lost, and rank 0 tells the others. A rank that cannot reach
    rank 0 reports rank 0 as lost.
    """
    import torch.distributed as dist

    group, timeout = _monitor.get("group"), _monitor.get("timeout")
    if group is None:
        return [], "no rank monitor"
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        lost = []
        for other in range(1, world):
            try:
                dist.irecv(torch.zeros(1), src=other, group=group).wait(timeout)
            except Exception:
                lost.append(other)
        report = torch.tensor(lost + [-1] * (world - len(lost)))
        for other in set(range(1, world)) - set(lost):
            with contextlib.suppress(Exception):  # it may have gone meanwhile
                dist.send(report, dst=other, group=group)
        return lost, "rank 0 heard nothing from them"
    report = torch.full((world,), -1, dtype=torch.int64)
    try:
        dist.send(torch.ones(1), dst=0, group=group)
        dist.irecv(report, src=0, group=group).wait(timeout)
    except Exception:
        return [0], "rank 0 does not answer"
    return [int(r) for r in report.tolist() if r >= 0], "as rank 0 reports"


def is_collective_failure(error: BaseException) -> bool:
    """A failure of the process group (a peer gone, a timeout), not of the training itself."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return False
    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(torch, "DistBackendError", None)) if k)
    if kinds and isinstance(error, kinds):
        return True
    text = str(error).lower()
    markers = ("connection closed by peer", "connection reset", "timed out", "gloo", "nccl", "socket", "broken pipe")
    return isinstance(error, RuntimeError) and any(m in text for m in markers)


def lost_rank_error(error: BaseException, where: str, timeout_s: float) -> LostRankError:
    """The error to raise on every surviving rank when a collective failed: which ranks are gone, if known."""
    import torch.distributed as dist

    ranks, how = lost_ranks()
    world, rank = dist.get_world_size(), dist.get_rank()
    who = f"lost rank {', '.join(map(str, ranks))} of {world}" if ranks else f"a rank of {world} failed ({how})"
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return LostRankError(
        f"Rank {rank}: {who} {where} ({type(error).__name__}: {first}). This process stops too. When every "
        f"machine is back, continue with --resume latest and the same number of processes. A rank that hangs "
        f"instead of dying is waited for train.dist_timeout_s={timeout_s:g} s (then up to a minute to name it)."
    )
