"""Imports stay one-way: the app's modules form no cycle (a module never imports one that builds on it)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import APP_DIR


def module_name(path: Path) -> str:
    rel = path.relative_to(APP_DIR).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """App modules ``path`` imports anywhere (functions included), type-checking-only imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_app_modules_form_no_import_cycle() -> None:
    files = [APP_DIR / "main.py", *sorted((APP_DIR / "lib").rglob("*.py"))]
    names = {module_name(f): f for f in files}
    graph = {n: imports_of(f, n, set(names)) for n, f in names.items()}
    # a package's __init__ is "imported" by every submodule import; only count its own code's imports
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if m.startswith(n + ".") or n.startswith(m + ".") and names[m].name == "__init__.py":
                continue  # a package and its own submodules
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert len(graph) > 40  # the walk saw the app, not an empty folder
