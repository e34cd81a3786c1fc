"""The package's layout rules (README, Layout) that import-linter's contracts in pyproject.toml do not express:
nothing imports the package face, no private name crosses a module, a function-local import of the package's own
modules says why, and no module outgrows a screenful of screens."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "derm_accel"
MAX_LINES = 600


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "derm_metrics" in path.parts:  # the evaluate metric module is loaded as a script by `evaluate`
            continue
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out.append((name, path, ast.parse(path.read_text())))
    return out


def _is_own(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").startswith("derm_accel")
    return isinstance(node, ast.Import) and any(a.name.startswith("derm_accel") for a in node.names)


def _own_imports(tree: ast.AST):
    return [node for node in ast.walk(tree) if _is_own(node)]


def test_the_package_face_is_imported_by_no_module() -> None:
    offenders = [
        f"{name}:{node.lineno}"
        for name, _, tree in _modules()
        if name != "derm_accel"
        for node in _own_imports(tree)
        if (isinstance(node, ast.ImportFrom) and node.module == "derm_accel")
        or (isinstance(node, ast.Import) and any(a.name == "derm_accel" for a in node.names))
    ]
    assert offenders == []


def test_no_private_name_is_imported_from_another_module() -> None:
    offenders = [
        f"{name}:{node.lineno} imports {node.module}.{alias.name}"
        for name, _, tree in _modules()
        for node in _own_imports(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert offenders == []


def test_function_local_imports_of_the_package_say_why() -> None:
    offenders = []
    for name, path, tree in _modules():
        lines = path.read_text().splitlines()
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn in functions:
            for node in _own_imports(fn):
                said = any("#" in lines[i] for i in range(node.lineno - 1, node.end_lineno))
                if not said and not lines[node.lineno - 2].strip().startswith("#"):
                    offenders.append(f"{name}:{node.lineno} in {fn.name}()")
    assert offenders == []


def test_no_module_is_longer_than_the_limit() -> None:
    long = {name: n for name, path, _ in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_import_contracts_hold() -> None:
    """import-linter's layer and forbidden contracts (pyproject.toml) over every import, function-local included."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]' installs it)")
    proc = subprocess.run([str(lint)], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and proc.stdout.count("KEPT") >= 2


def test_the_checks_see_a_violation() -> None:
    """The AST checks above are not vacuous: a module that breaks each rule is caught."""
    source = "from derm_accel import predict\nfrom derm_accel.x import _private\ndef f():\n    import derm_accel.y\n"
    bad = ast.parse(source)
    imports = list(_own_imports(bad))
    assert [getattr(n, "module", None) for n in imports] == ["derm_accel", "derm_accel.x", None]
    assert any(a.name.startswith("_") for a in imports[1].names)
