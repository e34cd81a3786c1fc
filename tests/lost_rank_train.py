"""Runs ``derm_accel.training.train.train`` like tests/ddp_train.py (``RESUME``: its --resume), and the rank named by
``LOSE_RANK`` kills itself (SIGKILL, as ``kill -9`` or a machine going down would) after ``LOSE_AFTER_STEPS``
optimizer steps (``LOSE_SIGNAL=SIGSTOP``: it hangs instead)."""

import os
import signal
import sys

import torch

import derm_accel.training.train as train_module

if __name__ == "__main__":
    torch.set_num_threads(1)
    lose_rank, after = int(os.environ.get("LOSE_RANK", "-1")), int(os.environ.get("LOSE_AFTER_STEPS", "0"))
    if int(os.environ.get("RANK", "0")) == lose_rank:
        real_step = train_module.train_step

        def step_then_die(run, state, batch, epoch):
            if state.global_step >= after:
                os.kill(os.getpid(), getattr(signal, os.environ.get("LOSE_SIGNAL", "SIGKILL")))
            return real_step(run, state, batch, epoch)

        train_module.train_step = step_then_die
    train_module.train(sys.argv[1], sys.argv[2:], resume=os.environ.get("RESUME") or None)
