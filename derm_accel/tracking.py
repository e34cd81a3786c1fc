"""A JSON Lines tracker for Accelerate: one line per ``accelerator.log`` call.

TensorBoard is for looking at curves; ``metrics.jsonl`` is for programs (plots in reports, tests, comparing
runs) and needs nothing but ``json`` to read.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class JSONLTracker(GeneralTracker):
    """Appends ``{"time", "step", **values}`` to ``logging_dir/metrics.jsonl`` (main process only)."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike, **kwargs: Any) -> None:
        # No process-group work here: Accelerate builds trackers before its state exists.
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / METRICS_FILE

    @on_main_process
    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self._write({"event": "config", "config": {k: _jsonable(v) for k, v in values.items()}})

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self._write({"step": step, **{k: _jsonable(v) for k, v in values.items()}})

    def _write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(logging_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged records (without the config record), oldest first."""
    path = Path(logging_dir) / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") != "config"]
