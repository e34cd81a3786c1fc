"""The ``derm-accel`` command line: parse options, call one stage function, print. No logic lives here.

:mod:`derm_accel.cli.app` holds the Typer app and the options every command shares; :mod:`~derm_accel.cli.pipeline`
the stages' commands and :mod:`~derm_accel.cli.tools` the others. Importing this package registers them all.
"""

from derm_accel.cli import pipeline, tools  # noqa: F401  (registers the commands, in the order --help lists them)
from derm_accel.cli.app import app

__all__ = ["app"]
