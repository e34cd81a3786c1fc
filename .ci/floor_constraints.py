"""For .ci/floors: WORK/floors.txt holds each direct dependency of derm-accel (and its demo and onnx extras, and
the test tools the floors job needs) pinned at its floor (NAME>=X -> NAME==X); WORK/tools.txt holds those tools.
torch and torchvision are left out: the job holds them at the machine's versions."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

# Not in the floors job: torchcodec (each release is built for one torch), playwright (the browser test), mlflow
# (one tracker test), ruff, import-linter and mypy (lint, layers and types: .ci/run), derm-accel's own extras.
SKIP = ("derm-accel", "torchcodec", "playwright", "mlflow", "ruff", "import-linter", "mypy")
HELD = ("torch", "torchvision")


def main(work: Path) -> None:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    tools = [r for r in extras["dev"] if not r.startswith(SKIP)]
    floors: dict[str, str] = {}
    for req in project["dependencies"] + extras["demo"] + extras["onnx"] + tools:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9][0-9.]*)", req)
        if match is None:
            sys.exit(f"pyproject.toml: {req!r} is not NAME>=FLOOR; every direct dependency needs a plain floor")
        name, floor = match.groups()
        if name not in HELD:
            floors[name] = floor
    (work / "tools.txt").write_text("".join(f"{r}\n" for r in tools))
    (work / "floors.txt").write_text("".join(f"{n}=={v}\n" for n, v in floors.items()))
    print("floors: " + " ".join(f"{n}=={v}" for n, v in floors.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
