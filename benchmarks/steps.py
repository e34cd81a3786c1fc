"""Run the per-step input benchmark: `python benchmarks/steps.py --help` (same as `derm-accel bench steps`).

Options are passed through to derm_accel.benchmarks.run_bench("steps", ...); lists are comma-separated
(e.g. --workers 1,2, --channels-last off,on).
"""

from __future__ import annotations

import sys

from derm_accel.benchmarks.cli_args import main

if __name__ == "__main__":
    sys.exit(main("steps"))
