"""Runs ``derm_accel.training.train.train`` on a recipe file; tests/test_ddp.py starts it via ``accelerate launch``."""

import sys

import torch

from derm_accel.training.train import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1], sys.argv[2:])
