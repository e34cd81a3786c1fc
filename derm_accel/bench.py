"""``derm-accel bench``'s entry point; the benchmarks themselves live in :mod:`derm_accel.benchmarks`."""

from derm_accel.benchmarks import KINDS, coerce_options, run_bench

__all__ = ["KINDS", "coerce_options", "run_bench"]
