"""The package's layers import downward only: the mechanism knows no method, training or
tool, and ``import evit_patch`` loads no training code. Checked in fresh interpreters, so
no other test's imports can hide a wrong arrow; a subpackage is imported under a bare
``evit_patch`` package, so that what the top-level ``__init__`` loads does not count.
No two modules import each other, directly or around a circle: read from the source, so
an import inside a function or under ``TYPE_CHECKING`` counts too."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

LAYERS = {
    "evit_patch.core": ("evit_patch.core", "evit_patch.errors"),
    "evit_patch.reducers": ("evit_patch.core", "evit_patch.errors", "evit_patch.reducers"),
    "evit_patch.dynamicvit": ("evit_patch.core", "evit_patch.errors", "evit_patch.losses", "evit_patch.dynamicvit"),
    "evit_patch.adapters": ("evit_patch.core", "evit_patch.errors", "evit_patch.adapters"),
    # measuring and choosing: the front, the quality measures and the timing are tensors and numbers only
    "evit_patch.tuning.front": ("evit_patch.tuning.front",),
    "evit_patch.tuning.quality": ("evit_patch.tuning.quality",),
    "evit_patch.tuning.timing": ("evit_patch.tuning.timing",),
    # the search puts settings on models: the methods layer below it
    "evit_patch.tuning.search": ("evit_patch.core", "evit_patch.errors", "evit_patch.extras", "evit_patch.reducers", "evit_patch.cost",
                                 "evit_patch.tuning"),
    "evit_patch": ("evit_patch.core", "evit_patch.errors", "evit_patch.extras", "evit_patch.losses", "evit_patch.reducers",
                   "evit_patch.dynamicvit", "evit_patch.cost", "evit_patch.models", "evit_patch.adapters",
                   "evit_patch.tuning"),
}


BARE_PARENT = """
import importlib.util, sys, types
parent = types.ModuleType("evit_patch")
parent.__path__ = list(importlib.util.find_spec("evit_patch").submodule_search_locations)
sys.modules["evit_patch"] = parent
"""


def loaded_modules(statement: str) -> set[str]:
    """The evit_patch modules a fresh interpreter holds after ``statement`` (a subpackage
    import runs under a bare parent package)."""
    setup = "" if statement == "import evit_patch" else BARE_PARENT
    code = f"{setup}\n{statement}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('evit_patch'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def _core_modules() -> list[str]:
    import pkgutil

    import evit_patch.core

    return [f"evit_patch.core.{info.name}" for info in pkgutil.iter_modules(evit_patch.core.__path__)]


@pytest.mark.parametrize("package", list(LAYERS))
def test_a_layer_loads_only_itself_and_the_layers_below(package: str) -> None:
    allowed = LAYERS[package]
    loaded = loaded_modules(f"import {package}")
    parents = {package.rsplit(".", depth)[0] for depth in range(package.count(".") + 1)}  # itself and those on the way
    strays = {m for m in loaded if m not in parents and not any(m == a or m.startswith(a + ".") for a in allowed)}
    assert not strays, f"import {package} loads {sorted(strays)}"


def test_every_core_module_stands_without_the_layers_above() -> None:
    modules = _core_modules()
    assert len(modules) > 10
    loaded = loaded_modules("\n".join(f"import {module}" for module in modules))
    above = {m for m in loaded if m not in ("evit_patch", "evit_patch.errors") and not m.startswith("evit_patch.core")}
    assert not above, f"the core imports {sorted(above)}"


def test_the_layer_check_sees_a_wrong_arrow() -> None:
    """The check itself can fail: the training package is above the core."""
    assert "evit_patch.train.loop" in loaded_modules("import evit_patch.tools.finetune")


@pytest.mark.parametrize("command, module", [("evit-finetune", "finetune"), ("evit-evaluate", "evaluate"),
                                             ("evit-visualize", "visualize")])
def test_command_lines_are_console_scripts_and_modules(command: str, module: str) -> None:
    from importlib import import_module
    from importlib.metadata import entry_points

    (script,) = [point for point in entry_points(group="console_scripts") if point.name == command]
    assert script.load() is import_module(f"evit_patch.{module}").main


def test_a_command_line_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "evit_patch.evaluate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


PACKAGE = Path(__file__).resolve().parent.parent / "evit_patch"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of ``package`` (a folder) -> the modules of it that its source imports,
    anywhere in the file. ``from a import b`` is module ``a.b`` where that is a module."""
    def name_of(path: Path) -> str:
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name_of(path): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names}
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_no_module_imports_itself_around_a_circle() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 80 and "evit_patch.reducers.counting" in graph["evit_patch.reducers.tome"]
    assert import_circles(graph) == []


def test_the_circle_check_sees_a_circle_through_a_function_level_or_type_checking_import(tmp_path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from pkg.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (package / "sub" / "c.py").write_text("def late():\n    import pkg.sub.a\n")
    (package / "d.py").write_text("from pkg.sub import a\n")
    assert import_circles(import_graph(package)) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]]
