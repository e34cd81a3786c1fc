"""Running a benchmark: its options (one parser, derived from the bench function), its JSON and, when asked,
its table in ``docs/benchmarks.md``.

Each benchmark is one script, ``python benchmarks/KIND.py --help``; from Python, ``run_bench(KIND, ...)``.
Results go to ``bench_results/KIND.json`` (``--out``); the docs table is rewritten only with
``--update-docs`` (or ``run_bench(..., docs=PATH)``), never as a side effect of measuring.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    current_command,
    default_docs_path,
    machine_info,
    now_iso,
    parse_bool,
    update_docs_section,
)
from derm_accel.core.fileio import atomic_write_json

# kind -> the script in benchmarks/ that holds bench_KIND and KIND_markdown
SCRIPTS = {
    "data": "data",
    "steps": "steps",
    "train": "train",
    "infer": "infer",
    "comm": "ddp_comm",
    "convert": "convert",
    "dedupe": "dedupe",
    "guard": "guard",
    "onnx": "onnx_runtime",
    "subgroups": "subgroups",
    "scale": "scale",
}
KINDS = tuple(SCRIPTS)

Bench = Callable[..., dict[str, Any]]
Markdown = Callable[[dict[str, Any]], str]


def _functions(kind: str) -> tuple[Bench, Markdown]:
    if kind not in SCRIPTS:
        raise ValueError(f"Unknown benchmark {kind!r}; choose one of {', '.join(KINDS)}")
    module = importlib.import_module(f"benchmarks.{SCRIPTS[kind]}")  # lazily: each pulls in different modules
    return getattr(module, f"bench_{kind}"), getattr(module, f"{kind}_markdown")


def _keyword_options(bench: Bench) -> dict[str, inspect.Parameter]:
    params = inspect.signature(bench).parameters.items()
    return {name: p for name, p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _option_type(param: inspect.Parameter) -> type | None:
    """str for sweeps (``Any``: "off,on", "1,2" are parsed by the bench); else the default's or annotation's type."""
    if str(param.annotation) == "Any":
        return str
    if param.default is not None:
        return type(param.default) if not isinstance(param.default, (tuple, list)) else str
    return {"int": int, "float": float, "bool": bool}.get(str(param.annotation).split("|")[0].strip(), str)


def coerce_options(bench: Bench, options: dict[str, Any]) -> dict[str, Any]:
    """Options as text (``"batch-size": "8"``) -> the bench's keywords and types.

    Unknown names fail with the list of valid ones; ``model`` is accepted for a bench that takes ``models``.
    """
    params = _keyword_options(bench)
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in params and name == "model" and "models" in params:
            name = "models"
        if name not in params:
            raise ValueError(f"Unknown option {key!r} for {bench.__name__}; valid options: {', '.join(sorted(params))}")
        kind = _option_type(params[name])
        if isinstance(value, str) and kind in (bool, int, float):
            try:
                value = parse_bool(value) if kind is bool else kind(value)
            except ValueError as e:
                raise ValueError(f"Option {key}={value!r}: expected {kind.__name__}") from e
        out[name] = value
    return out


def run_bench(
    kind: str,
    *,
    out: str | os.PathLike | None = None,
    docs: str | os.PathLike | None = None,
    update_docs: bool = False,
    command: str | None = None,
    section: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the ``kind`` benchmark with ``options``; return its results, also written as JSON to ``out``.

    The docs table (``section``, default ``kind``) is rewritten in ``docs``, or with ``update_docs`` in the
    checkout's ``docs/benchmarks.md``; otherwise no docs file is touched. ``command`` defaults to this
    process's command line, recorded so anyone can rerun exactly what produced the numbers. Options left as
    None take the bench's defaults.
    """
    bench, to_markdown = _functions(kind)
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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, results, default=str)
    results["json"] = str(out_path)
    if docs is not None or update_docs:
        docs_path = Path(docs) if docs is not None else default_docs_path()
        update_docs_section(docs_path, section or kind, to_markdown(results) + f"\nJSON: `{out_path.name}`.\n")
        results["docs"] = str(docs_path)
    return results


def _bool(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser(kind: str) -> argparse.ArgumentParser:
    """The options of ``benchmarks/KIND.py``: the bench function's keywords, plus where results go."""
    bench, _ = _functions(kind)
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{SCRIPTS[kind]}.py",
        description=(bench.__doc__ or "").strip(),
        epilog="List options take comma-separated values, e.g. --workers 1,2 or --compile off,on.",
    )
    parser.add_argument("--out", help=f"JSON path (default bench_results/{kind}.json)")
    parser.add_argument(
        "--update-docs",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="Also rewrite this benchmark's table in PATH (default: the checkout's docs/benchmarks.md)",
    )
    parser.add_argument("--section", help=f"Docs table to rewrite (default {kind})")
    for name, param in _keyword_options(bench).items():
        default = param.default
        if default is None:
            shown = "auto"
        else:
            shown = ",".join(str(v) for v in default) if isinstance(default, (tuple, list)) else default
        kind_of = _option_type(param)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=_bool if kind_of is bool else kind_of,
            **({"nargs": "?", "const": True} if kind_of is bool else {}),  # a bare --quick means on
            default=None,
            help=f"{'on/off ' if kind_of is bool else ''}(default {shown})",
        )
    return parser


def main(kind: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` for the ``kind`` benchmark, run it, print its summary."""
    args = vars(build_parser(kind).parse_args(argv))
    out, docs, section = args.pop("out"), args.pop("update_docs"), args.pop("section")
    results = run_bench(kind, out=out, docs=docs or None, update_docs=docs is not None, section=section, **args)
    print(json.dumps({"results": results["results"], "summary": results["summary"]}, indent=2, default=str))
    print(f"wrote {results['json']}" + (f" and updated {results['docs']}" if "docs" in results else ""))
    return 0
