"""Command-line options for the scripts in ``benchmarks/``, derived from each bench function's keywords.

Deriving them keeps scripts, CLI and Python API in step: a new bench option needs no parser edit.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Sequence
from typing import Any

from derm_accel.benchmarks.common import parse_bool


def _bool(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser(kind: str) -> argparse.ArgumentParser:
    from derm_accel.benchmarks import _registry

    bench, _ = _registry()[kind]
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{kind}.py",
        description=(bench.__doc__ or "").strip(),
        epilog="List options take comma-separated values, e.g. --workers 1,2 or --compile off,on.",
    )
    parser.add_argument("--out", help=f"JSON path (default bench_results/{kind}.json)")
    parser.add_argument("--docs", help="Markdown file to update (default docs/benchmarks.md of the checkout)")
    parser.add_argument("--no-docs", action="store_true", help="Do not touch the docs table")
    parser.add_argument("--section", help=f"Docs table to rewrite (default {kind})")
    for name, param in inspect.signature(bench).parameters.items():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        default = param.default
        flag = "--" + name.replace("_", "-")
        if default is None:  # typed by its annotation, e.g. "int | None"
            base = str(param.annotation).split("|")[0].strip()
            default = {"int": 0, "float": 0.0, "bool": False}.get(base, "")
            shown = "auto"
        else:
            shown = ",".join(str(v) for v in default) if isinstance(default, (tuple, list)) else default
        if str(param.annotation) == "Any":  # sweeps: "off,on", "1,2", ... parsed by the bench
            default = str(default)
        if isinstance(default, bool):
            parser.add_argument(flag, type=_bool, default=None, help=f"on/off (default {shown})")
        elif isinstance(default, int):
            parser.add_argument(flag, type=int, default=None, help=f"(default {shown})")
        elif isinstance(default, float):
            parser.add_argument(flag, type=float, default=None, help=f"(default {shown})")
        else:
            parser.add_argument(flag, default=None, help=f"(default {shown})")
    return parser


def main(kind: str, argv: Sequence[str] | None = None) -> int:
    from derm_accel.benchmarks import run_bench

    args = vars(build_parser(kind).parse_args(argv))
    out, docs, no_docs, section = args.pop("out"), args.pop("docs"), args.pop("no_docs"), args.pop("section")
    results = run_bench(kind, out=out, docs=docs, update_docs=not no_docs, section=section, **args)
    print(json.dumps({"results": results["results"], "summary": results["summary"]}, indent=2, default=str))
    print(f"wrote {results['json']}" + (f" and updated {results['docs']}" if "docs" in results else ""))
    return 0


__all__: list[Any] = ["build_parser", "main"]
