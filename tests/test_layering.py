"""The package's layers import downward only: the mechanism knows no method, training or
tool, and ``import evit_patch`` loads no training code. Checked in fresh interpreters, so
no other test's imports can hide a wrong arrow; a subpackage is imported under a bare
``evit_patch`` package, so that what the top-level ``__init__`` loads does not count."""

import json
import subprocess
import sys

import pytest

LAYERS = {
    "evit_patch.core": ("evit_patch.core", "evit_patch.errors"),
    "evit_patch.reducers": ("evit_patch.core", "evit_patch.errors", "evit_patch.reducers"),
    "evit_patch.dynamicvit": ("evit_patch.core", "evit_patch.errors", "evit_patch.losses", "evit_patch.dynamicvit"),
    "evit_patch.adapters": ("evit_patch.core", "evit_patch.errors", "evit_patch.adapters"),
    "evit_patch.tuning": ("evit_patch.tuning",),  # pure choice by measurement: tensors and numbers only
    "evit_patch": ("evit_patch.core", "evit_patch.errors", "evit_patch.extras", "evit_patch.losses", "evit_patch.reducers",
                   "evit_patch.dynamicvit", "evit_patch.cost", "evit_patch.models", "evit_patch.adapters"),
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
    strays = {m for m in loaded if m != "evit_patch" and not any(m == a or m.startswith(a + ".") for a in allowed)}
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
