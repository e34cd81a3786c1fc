"""The installed version of derm-accel, read from the distribution's metadata (pyproject.toml holds the only
literal)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("derm-accel")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
