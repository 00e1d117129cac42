"""Fine-tuning recipes: YAML validated into typed pydantic models before any work starts.

An unknown key names the closest valid one; a wrong type names the expected one; every
value is checked against its range (:mod:`evit_patch.train.recipe_schema`), then the files
the recipe points at (:mod:`evit_patch.train.recipe_files`), then what timm must know: model
and optimizer names, layers against the model's depth (:mod:`evit_patch.train.recipe_models`),
all before any data or model is built. ``--set a.b=c`` overrides are applied before checking.
Every problem is one :class:`RecipeError` of one line naming the key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from evit_patch.train.messages import RecipeError, one_line, short
from evit_patch.train.recipe_errors import RENAMED, recipe_error
from evit_patch.train.recipe_files import resolve_files
from evit_patch.train.recipe_models import check_values
from evit_patch.train.recipe_schema import Recipe, ReductionConfig, recipe_schema, reduces_tokens
from evit_patch.train.recipe_sections import (
    DataConfig,
    DynamicViTConfig,
    KeepRateScheduleConfig,
    ModelConfig,
    OptimizerConfig,
    PrunedShapeConfig,
    StructuralConfig,
    TeacherConfig,
    TokenLabelingConfig,
    TrainConfig,
)


def validated(values: Any) -> Recipe:
    """``values`` (a recipe's mapping) as a :class:`Recipe`, or the one-line error; ``values`` is not changed."""
    schema = recipe_schema()
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        raise recipe_error(error, schema) from None


def apply_overrides(values: Any, overrides: list[str]) -> dict:
    """``a.b=c`` pairs into the nested mapping; values are read as YAML scalars."""
    if overrides and not isinstance(values, dict):
        raise RecipeError(f"--set needs a recipe that is a mapping of sections; this one is a "
                          f"{type(values).__name__}: {short(values)}")
    for override in overrides:
        path, separator, raw = override.partition("=")
        if not separator:
            raise RecipeError(f"--set expects key.sub=value, got {short(override)}")
        *parents, last = path.split(".")
        node = values
        for part in parents:
            if node.get(part) is None:  # an empty section (`teacher:`) takes keys like a missing one
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"--set {short(override)}: {part!r} is not a section")
        node[last] = parse_yaml(raw, f"--set {short(path, quote=False)}: the value {short(raw)}")
    return values


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` whose every failure is a one-line :class:`RecipeError` about ``what``."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{what} is not valid YAML: {one_line(error.problem or error.context)}{where}") from None
    except (yaml.YAMLError, ValueError, OverflowError) as error:  # bad dates, `!!int x`, `0x_`
        raise RecipeError(f"{what} is not valid YAML: {one_line(error)}") from None
    except RecursionError:
        raise RecipeError(f"{what} is not valid YAML: nested too deeply") from None


def _read_recipe_file(path: Path) -> Any:
    """The YAML document of a recipe file (an empty file: no keys)."""
    if path.is_dir():
        raise RecipeError(f"recipe path {str(path)!r} is a folder; pass a YAML recipe file (see recipes/)")
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                          f"offset {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {error.strerror}") from None
    values = parse_yaml(text, f"recipe file {str(path)!r}")
    return {} if values is None else values


def load_recipe(path: str | Path, overrides: list[str] | None = None, missing: Optional[list[str]] = None) -> Recipe:
    """Read, override and validate a recipe; relative file paths are taken from the
    current folder, else from the project root the recipe lives under. Given ``missing``
    (a dry run), absent data folders and weight files are listed there, not refused."""
    path = Path(path)
    recipe = validated(apply_overrides(_read_recipe_file(path), overrides or []))
    resolve_files(recipe, path.resolve().parent.parent, missing)
    check_values(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump()


def with_current_names(values: Any) -> Any:
    """A copy of a stored recipe's mapping with the keys of :data:`RENAMED` under their names now."""
    values = copy.deepcopy(values)
    for old, new in RENAMED.items():  # a section first, then the keys inside it
        *parents, last = old.split(".")
        node = values
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and new.split(".")[-1] not in node:
            node[new.split(".")[-1]] = node.pop(last)
    return values


def recipe_from_dict(values: dict) -> Recipe:
    """A recipe a run stored (earlier versions' key names read as now)."""
    return validated(with_current_names(values))


__all__ = ["Recipe", "RecipeError", "ModelConfig", "TeacherConfig", "ReductionConfig", "DynamicViTConfig",
           "KeepRateScheduleConfig", "DataConfig", "OptimizerConfig", "TrainConfig", "StructuralConfig",
           "PrunedShapeConfig", "TokenLabelingConfig", "RENAMED", "load_recipe", "recipe_to_dict", "recipe_from_dict",
           "apply_overrides", "parse_yaml", "check_values", "reduces_tokens", "with_current_names"]
