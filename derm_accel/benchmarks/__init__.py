"""Benchmarks: input pipeline (end to end and step by step), training step, inference and DDP communication.

``run_bench(kind, **options)`` runs one, writes its JSON (default ``bench_results/<kind>.json``) and rewrites
that kind's table in ``docs/benchmarks.md``, so the docs always show what the last run measured,
where and how.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from derm_accel.benchmarks.common import (
    current_command,
    default_docs_path,
    machine_info,
    now_iso,
    parse_bool,
    update_docs_section,
    write_json,
)

KINDS = ("data", "steps", "train", "infer", "comm")


def _registry() -> dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]]:
    # Imported lazily: each bench pulls in different heavy modules.
    from derm_accel.benchmarks.comm import bench_comm, comm_markdown
    from derm_accel.benchmarks.data import bench_data, data_markdown
    from derm_accel.benchmarks.infer import bench_infer, infer_markdown
    from derm_accel.benchmarks.steps import bench_steps, steps_markdown
    from derm_accel.benchmarks.train import bench_train, train_markdown

    return {
        "data": (bench_data, data_markdown),
        "steps": (bench_steps, steps_markdown),
        "train": (bench_train, train_markdown),
        "infer": (bench_infer, infer_markdown),
        "comm": (bench_comm, comm_markdown),
    }


def coerce_options(bench: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """Options as a CLI passes them (``"batch-size": "8"``) -> the bench's keywords and types.

    Unknown names fail with the list of valid ones; ``model`` is accepted for a bench that takes ``models``.
    """
    params = {
        name: p for name, p in inspect.signature(bench).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in params and name == "model" and "models" in params:
            name = "models"
        if name not in params:
            raise ValueError(f"Unknown option {key!r} for {bench.__name__}; valid options: {', '.join(sorted(params))}")
        if isinstance(value, str):
            default = params[name].default
            kind = type(default) if default is not None else None
            if str(params[name].annotation) == "Any":  # sweeps ("off,on", "1,2") are parsed by the bench
                kind = str
            elif kind is None:  # typed by the annotation, e.g. "int | None"
                kind = {"int": int, "float": float, "bool": bool}.get(
                    str(params[name].annotation).split("|")[0].strip()
                )
            try:
                if kind is bool:
                    value = parse_bool(value)
                elif kind in (int, float):
                    value = kind(value)
            except ValueError as e:
                raise ValueError(f"Option {key}={value!r}: expected {kind.__name__}") from e
        out[name] = value
    return out


def run_bench(
    kind: str,
    *,
    out: str | os.PathLike | None = None,
    update_docs: bool = True,
    docs: str | os.PathLike | None = None,
    command: str | None = None,
    section: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the ``kind`` benchmark with ``options``; return its results, also written as JSON to ``out``.

    ``docs`` defaults to the checkout's ``docs/benchmarks.md``; ``command`` defaults to this process's command
    line, recorded so anyone can rerun exactly what produced the numbers. ``section`` names the docs table
    (default ``kind``), so that e.g. a compile sweep keeps its own table next to the main one. Options left
    as None take the bench's defaults (so a CLI can pass every option through).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown benchmark {kind!r}; choose one of {', '.join(KINDS)}")
    bench, to_markdown = _registry()[kind]
    options = coerce_options(bench, {k: v for k, v in options.items() if v is not None})
    device = options.get("device")
    machine = machine_info(None if device in (None, "auto") else str(device))  # load average before the run
    created = now_iso()
    measured = bench(**options)
    results: dict[str, Any] = {
        "kind": kind,
        "created": created,
        "machine": machine,
        "command": command or current_command(),
        **measured,
    }
    out_path = Path(out) if out else Path("bench_results") / f"{kind}.json"
    write_json(results, out_path)
    results["json"] = str(out_path)
    if update_docs:
        docs_path = Path(docs) if docs else default_docs_path()
        update_docs_section(docs_path, section or kind, to_markdown(results) + f"\nJSON: `{out_path.name}`.\n")
        results["docs"] = str(docs_path)
    return results


__all__ = ["KINDS", "coerce_options", "run_bench"]
