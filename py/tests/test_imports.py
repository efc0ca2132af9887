"""The ``dragon`` package imports one way: no module reaches itself through imports.

Every module of the installed package is parsed (not imported) and every ``import`` and
``from ... import`` of a ``dragon`` module is an edge, at module level and inside functions
alike: an import deferred into a function (for start-up speed) still says which module
depends on which, so a cycle held together by such imports fails here too.
"""

from __future__ import annotations

import ast
import pathlib

import dragon
import pytest


def modules_of(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """``{module name: source file}`` of the package at ``root`` (packages by their
    ``__init__.py``)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``. ``from a import b`` is an edge to
    ``a.b`` when that is a module (Python or extension), else to ``a``."""
    modules = modules_of(root, package)
    # Extension modules: built (*.so) where the package is installed, a stub (*.pyi) in source.
    known = set(modules) | {
        f"{package}.{p.name.split('.')[0]}" for p in [*root.glob("*.so"), *root.glob("*.pyi")]
    }
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                if (t == package or t.startswith(package + ".")) and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_dragon_package_has_no_import_cycle():
    root = pathlib.Path(dragon.__file__).parent
    graph = import_graph(root, "dragon")
    assert len(graph) > 30  # the package was found
    assert "dragon._conn" in graph["dragon._mp"]  # imports inside functions count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "files, cycle",
    [
        ({"a.py": "from pkg import b\n", "b.py": "def f():\n    from pkg import a\n"}, True),
        ({"a.py": "from . import b\n", "b.py": "import pkg.c\n", "c.py": "from .a import x\n"}, True),
        ({"a.py": "from pkg import b\n", "b.py": "def f():\n    import pkg.c\n", "c.py": ""}, False),
    ],
)
def test_the_check_finds_cycles(tmp_path, files, cycle):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)
    assert (find_cycle(import_graph(root, "pkg")) is not None) == cycle
