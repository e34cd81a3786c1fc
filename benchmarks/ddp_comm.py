"""DDP gradient communication per step and the multi-GPU efficiency it implies, per recipe model.

`python benchmarks/ddp_comm.py --models efficientnet_b3,densenet121 --measure-gloo true`
Options are passed through to derm_accel.benchmarks.run_bench("comm", ...).
"""

from __future__ import annotations

import sys

from derm_accel.benchmarks.cli_args import main

if __name__ == "__main__":
    sys.exit(main("comm"))
