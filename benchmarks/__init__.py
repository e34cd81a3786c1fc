"""derm-accel's benchmarks: one script per benchmark (``python benchmarks/data.py --help``), kept out of the
installed package. Figures and the commands that produced them: docs/benchmarks.md."""
