"""The CLI lists every stage, each with help text and examples, and bad input fails with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from derm_accel.cli import app

COMMANDS = ["convert", "train", "evaluate", "push", "predict", "explain", "serve", "quickstart", "bench"]
runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help_and_examples(name: str) -> None:
    result = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Examples" in result.output
    assert f"derm-accel {name}" in result.output or "derm_accel" in result.output


def test_python_dash_m_runs_the_same_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "derm_accel", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "quickstart" in out


def test_missing_source_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = runner.invoke(app, ["convert", str(missing), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert str(missing) in result.output


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "thesis.md").write_text("precious")
    result = runner.invoke(app, ["quickstart", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "not made by the quickstart" in result.output
    assert (tmp_path / "report" / "thesis.md").read_text() == "precious"
