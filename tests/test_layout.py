"""The shape of the code: module sizes, import cycles, which layer may import what, and a README that names it all.

A facade delegates (the Trainer stays small), modules keep one job (no file grows past a screenful of
screens), the engine never imports a view library at module level, views import no torch, and no two
modules import each other, directly or around a loop, not even from inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("workbench", "app")
VIEW_LIBRARIES = ("streamlit", "ipywidgets", "plotly", "anywidget")


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs at import time) for every import in the file, inside functions too. A
    ``from X import name`` names X.name when that is a module of ours, else X."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    ours = {_module(p) for pkg in PACKAGES for p in _files(pkg)}
    out: list[tuple[str, int, bool]] = []

    def walk(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, top) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in ours else mod, node.lineno, top))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            walk(child, inner)

    walk(ast.parse(path.read_text()), True)
    return out


def test_the_trainer_is_a_facade_and_no_module_is_oversized():
    trainer = ROOT / "workbench" / "trainer.py"
    assert len(trainer.read_text().splitlines()) <= 450
    too_long, big_classes = [], []
    for package in PACKAGES:
        for path in _files(package):
            text = path.read_text()
            if len(text.splitlines()) > 600:
                too_long.append(f"{path.relative_to(ROOT)} ({len(text.splitlines())} lines)")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 450:
                    big_classes.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not too_long and not big_classes, (too_long, big_classes)


def test_no_import_cycle_even_through_function_level_imports():
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in _files(package):
            graph[_module(path)] = {m for m, _, _ in _imports(path)}
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_views_import_no_torch_and_the_engine_no_view_library_at_module_level():
    torch_in_views = [f"{p.relative_to(ROOT)}:{line}" for pkg in ("app", "workbench/notebook")
                      for p in _files(pkg) for m, line, _ in _imports(p) if m.split(".")[0] == "torch"]
    assert not torch_in_views
    views_in_engine = [f"{p.relative_to(ROOT)}:{line} {m}" for p in _files("workbench")
                       if "notebook" not in p.parts and p.name != "figures.py"
                       for m, line, top in _imports(p) if top and m.split(".")[0] in VIEW_LIBRARIES]
    assert not views_in_engine


def test_the_readme_is_short_and_its_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set()
    for word in layout.replace(",", " ").split():
        named.add(word.strip("`();:").rsplit("/", 1)[-1])
    missing = []
    for package in PACKAGES:
        for path in _files(package):
            rel = path.relative_to(ROOT / package)
            if len(rel.parts) > 1:  # a subpackage is named as a folder
                if f"{rel.parts[0]}/" not in layout:
                    missing.append(f"{package}/{rel.parts[0]}/")
            elif path.name != "__init__.py" or package == "workbench":
                if path.name not in named and not (path.name.startswith("tab_") and "tab_*.py" in layout):
                    missing.append(f"{package}/{path.name}")
    assert not sorted(set(missing)), sorted(set(missing))
