"""Run the infer benchmark: `python benchmarks/infer.py --help` (same as `derm-accel bench infer`).

Options are passed through to derm_accel.benchmarks.run_bench("infer", ...); lists are comma-separated
(e.g. --workers 1,2, --channels-last off,on).
"""

from __future__ import annotations

import sys

from derm_accel.benchmarks.cli_args import main

if __name__ == "__main__":
    sys.exit(main("infer"))
