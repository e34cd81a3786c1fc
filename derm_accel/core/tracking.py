"""A JSON Lines tracker for Accelerate: one line per ``accelerator.log`` call.

TensorBoard is for looking at curves; ``metrics.jsonl`` is for programs (plots in reports, tests, comparing
runs) and needs nothing but ``json`` to read. The file is append-only: a resumed run writes a ``resume``
record, and :func:`read_metrics` drops what the interrupted run logged after the checkpoint it resumed from
(those steps are run, and logged, again).
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
    def mark_resume(self, step: int, epochs_done: int) -> None:
        """Record that training continues from the checkpoint at optimizer ``step`` after ``epochs_done`` epochs."""
        self._write({"event": "resume", "step": step, "epochs_done": epochs_done})

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self._write({"step": step, **{k: _jsonable(v) for k, v in values.items()}})

    def _write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _after(record: dict[str, Any], resume: dict[str, Any]) -> bool:
    """Whether ``record`` was logged after the checkpoint that ``resume`` continues from."""
    step = record.get("step")
    if step is not None and step > resume["step"]:
        return True
    # An epoch's closing record shares the step of a checkpoint taken on the epoch's last batch.
    return "train/loss_epoch" in record and record.get("epoch", 0) > resume["epochs_done"]


def read_metrics(logging_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged records (without config and resume records), oldest first, as one uninterrupted run."""
    path = Path(logging_dir) / METRICS_FILE
    records: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("event") == "resume":
            records = [r for r in records if not _after(r, record)]
        elif record.get("event") != "config":
            records.append(record)
    return records
