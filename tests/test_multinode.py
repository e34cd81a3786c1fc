"""Two "machines" on loopback (accelerate launch with num_machines 2, machine_rank 0 and 1, main_process_ip
127.0.0.1, gloo; the fields of accelerate_configs/2node_4gpu.yaml), one process each.

Their checkpoints hold the weights of one process trained on the same global batches (GroupNorm model: see
tests/test_ddp.py for why the two agree). Then one rank is killed mid-epoch (SIGKILL): the survivor exits on
its own, well within the process-group timeout (train.dist_timeout_s), naming the lost rank. (Continuing such a
run with --resume latest on both machines was checked by hand; it costs another launch, about a minute here.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from derm_accel.training.checkpoints import list_checkpoints
from tests.train_utils import make_dataset, reset_accelerate, tiny_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed
ATOL = 1e-5  # as in tests/test_ddp.py: float summation order only
TIMEOUT_S = 20  # train.dist_timeout_s: a rank that stops answering is waited for this long


def _recipe(data: Path, out: Path, batch_size: int) -> dict:
    recipe = tiny_recipe(
        data,
        out,
        data={"batch_size": batch_size, "balance": "sampler"},
        optim={"lr": 1e-3, "warmup_epochs": 0.5},
        train={"epochs": 1, "mixed_precision": "no", "checkpoint_every_steps": 1, "dist_timeout_s": TIMEOUT_S},
    )
    recipe["guard"] = {"enabled": False}
    return recipe


def _two_machines(recipe: Path, port: int, cwd: Path, **env_extra: str) -> list[tuple[int, float, str]]:
    """Launch machine 0 and machine 1 together; (exit code, seconds until it exited, stderr) of each."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", **env_extra)
    common = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "2node_4gpu.yaml"),
        "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "--mixed_precision", "no",
    ]  # fmt: skip
    script = [str(REPO / "tests" / "lost_rank_train.py"), str(recipe)]
    started, procs, logs = time.monotonic(), [], []
    for machine in (0, 1):
        logs.append(cwd / f"machine{machine}.log")
        command = [*common, "--machine_rank", str(machine), *script]
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log))
    ended: dict[int, float] = {}
    while len(ended) < 2 and time.monotonic() - started < 240:
        for machine, proc in enumerate(procs):
            if machine not in ended and proc.poll() is not None:
                ended[machine] = time.monotonic() - started
        time.sleep(0.1)
    for proc in procs:
        proc.kill() if proc.poll() is None else None
    return [(proc.wait(), ended.get(m, float("inf")), logs[m].read_text()) for m, proc in enumerate(procs)]


def test_two_machines_match_one_process_and_a_lost_rank_is_named(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", size=32)
    torch.set_num_threads(2)
    from derm_accel.training.train import train

    reset_accelerate()
    single = train(_recipe(data, tmp_path / "single", batch_size=8), ["train.stop_after_steps=2"])
    reset_accelerate()

    # Two machines, 4 images per process: the same global batches. Rank 1 is killed before its 3rd step.
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data, tmp_path / "two", batch_size=4)))
    (rc0, t0, err0), (rc1, t1, _) = _two_machines(recipe, 29581, tmp_path, LOSE_RANK="1", LOSE_AFTER_STEPS="2")
    assert rc0 != 0 and rc1 != 0
    assert "lost rank 1 of 2 at epoch 1, after optimizer step 2" in err0, err0[-3000:]
    assert "--resume latest" in err0
    assert t0 - t1 < TIMEOUT_S, (t0, t1)  # the survivor stopped on its own, well within the timeout
    two = tmp_path / "two"
    assert [p.name for p in list_checkpoints(two)] == ["step_000000001", "step_000000002"]
    for step in (1, 2):
        w_two = load_file(two / "checkpoints" / f"step_{step:09d}" / "model.safetensors")
        w_one = load_file(single / "checkpoints" / f"step_{step:09d}" / "model.safetensors")
        worst = max((w_two[k] - w_one[k]).abs().max().item() for k in w_one)
        assert worst < ATOL, f"step {step}: two machines differ from one process by {worst:.2e}"
    # ...while one step (lr 7.5e-4) moved the weights by ~50 times that.
    start = load_file(single / "checkpoints" / "step_000000001" / "model.safetensors")
    assert max((w_one[k] - start[k]).abs().max().item() for k in w_one) > 20 * ATOL
