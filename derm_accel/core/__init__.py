"""Shared by every stage: errors, paths, atomic file writes, the artifacts stages hand each other, run
information, trackers, distributed helpers, the version and the default device. Imports nothing else of derm_accel.
"""
