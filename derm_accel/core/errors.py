"""The errors derm-accel raises on purpose, and the exit code the CLI gives each.

Every error class of the package derives from :class:`DermAccelError`; its message names the file or option
at fault and the fix. The CLI catches errors in one place (:func:`exit_code` decides) with click's meaning of
exit codes: 2 for a usage error (an option, recipe, path or input file that cannot be used as given), 1 for a
failure while running (a diverging loss, a refused upload). Input errors are also ``ValueError``\\ s and the
run-time ones ``RuntimeError``\\ s, so code that catches those keeps working.
"""

from __future__ import annotations

USAGE = 2  # click.UsageError's exit code
FAILURE = 1  # click.ClickException's exit code


class DermAccelError(Exception):
    """Base of the errors derm-accel raises on purpose."""

    exit_code = FAILURE


class InputError(DermAccelError, ValueError):
    """An option, recipe, path or input file cannot be used as given; the message says what to change."""

    exit_code = USAGE


class OutputExistsError(InputError, FileExistsError):
    """An output path already holds files this command did not write; it never overwrites them."""


class RunError(DermAccelError, RuntimeError):
    """A stage failed while running on valid input (the loss diverged, the Hub refused an upload)."""

    exit_code = FAILURE


# Built-in errors the stages raise for bad input: a wrong value, a path that is missing or already taken.
_USAGE_BUILTINS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def exit_code(error: BaseException) -> int | None:
    """The CLI's exit code for ``error``, or None for an error that is a bug (its traceback should show)."""
    if isinstance(error, DermAccelError):
        return error.exit_code
    if isinstance(error, _USAGE_BUILTINS):
        return USAGE
    if isinstance(error, OSError):  # e.g. a full disk, a port in use, the network
        return FAILURE
    return None
