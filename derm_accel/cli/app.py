"""The ``derm-accel`` command line: parse options, call one stage function, print. No logic lives here."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from derm_accel.core.errors import exit_code
from derm_accel.core.version import __version__


def is_main_rank() -> bool:
    """Under `accelerate launch` every rank runs the command; only rank 0 prints the summary."""
    return os.environ.get("RANK", "0") == "0"


def key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--opt {item!r} is not key=value (e.g. --opt steps=5)")
    return key, value


class _Commands(TyperGroup):
    """Reports the errors a stage raises for the user (see :func:`derm_accel.core.errors.exit_code`) in one place:
    ``error: MESSAGE`` on stderr and exit code 2 for a usage error, 1 for a failure while running. Any other
    exception is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            code = exit_code(e)
            if code is None:
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=code) from None


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"derm-accel {__version__}")
        raise typer.Exit()


Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (it is also off when stderr is no terminal).")
]


def _choices(name: str, *values: str) -> type[Enum]:
    """An enumerated option for typer: the help lists the values, and a typo is refused before anything runs."""
    return Enum(name, [(v.replace("-", "_"), v) for v in values], type=str)


Conflicts = _choices("Conflicts", "drop", "keep-majority")
TTA = _choices("TTA", "flip", "none")
Backend = _choices("Backend", "torch", "onnxruntime")
BenchKind = _choices(
    "BenchKind", "data", "steps", "train", "infer", "comm", "convert", "dedupe", "guard", "onnx", "subgroups",
    "scale",
)
ExportFormat = _choices("ExportFormat", "onnx")


app = typer.Typer(
    name="derm-accel",
    help="Train, evaluate and publish skin-disease image classifiers: class folders -> Arrow dataset -> "
    "timm model -> report -> Hugging Face Hub.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
    cls=_Commands,
)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


if __name__ == "__main__":
    app()
