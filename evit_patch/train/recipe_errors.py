"""Pydantic's validation errors as the one line a recipe error is: the dotted key and the fix.

Of all the errors pydantic finds, the one shown is a misspelt or renamed key first, then
missing keys (all of one section together), then the first other error. A misspelt key
names the closest valid one; a value out of range says what it must be (the field's ``must``).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Optional

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from evit_patch.train.messages import RecipeError, closest, short

RENAMED: dict[str, str] = {"evit": "reduction", "reduction.reducer": "reduction.method",
                           "dynamicvit.keep_ratio": "dynamicvit.keep_rate"}
"""Keys of earlier versions -> their names now. A recipe that still uses one is refused,
naming the new key; a recipe a run stored (checkpoint, run folder) is read with the new names."""

_TYPES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool", "dict_type": "dict",
          "list_type": "a list"}
_RANGES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def dotted(loc: tuple[Any, ...]) -> str:
    """``("reduction", "layers", 0)`` as ``reduction.layers[0]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def unwrapped(annotation: Any) -> Any:
    """``Optional[X]`` and ``Annotated[X, ...]`` as ``X``."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(arg for arg in args if arg is not type(None))
        elif origin is typing.Annotated:
            annotation = args[0]
        else:
            return annotation


def field_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> Optional[FieldInfo]:
    """The field of ``schema`` that ``loc`` (strings only) reaches, or None."""
    model: Any = schema
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = unwrapped(info.annotation)
    return info


def _section(schema: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    return schema if not loc else unwrapped(field_at(schema, loc).annotation)


def recipe_error(error: ValidationError, schema: type[BaseModel]) -> RecipeError:
    """The one-line :class:`RecipeError` for ``error``, raised validating ``schema``."""
    errors = error.errors(include_url=False)
    kinds = [[e for e in errors if e["type"] == "extra_forbidden"], [e for e in errors if e["type"] == "missing"], errors]
    first = next(group for group in kinds if group)[0]
    loc, kind, value = tuple(first["loc"]), first["type"], first.get("input")
    key, parent = dotted(loc), loc[:-1]
    if kind == "extra_forbidden":
        if key in RENAMED:
            return RecipeError(f"recipe key '{key}' is now '{RENAMED[key]}': rename it in the recipe (or the --set)")
        names = list(_section(schema, parent).model_fields)
        prefix = f"{dotted(parent)}." if parent else ""
        close = closest(loc[-1], names)
        hint = f"; did you mean '{prefix}{close}'?" if close else f"; valid keys here: {names}"
        return RecipeError(f"unknown recipe key '{prefix}{short(loc[-1], quote=False)}'{hint}")
    if kind == "missing":
        missing = [dotted(tuple(e["loc"])) for e in errors if e["type"] == "missing" and tuple(e["loc"])[:-1] == parent]
        return RecipeError(f"recipe is missing required key(s) {missing}")
    if kind in ("model_type", "model_attributes_type"):
        return RecipeError(f"{key or 'recipe'}: expected a mapping of keys, got {short(value)}")
    if kind in _TYPES:
        return RecipeError(f"{key}: expected {_TYPES[kind]}, got {short(value)}")
    if kind == "literal_error":
        choices = list(typing.get_args(unwrapped(field_at(schema, loc).annotation)))
        close = closest(value, choices)
        return RecipeError(f"{key}: {short(value)} is not one of {choices}" + (f"; did you mean {close!r}?" if close else ""))
    if kind in _RANGES:
        info = field_at(schema, loc)
        extra = info.json_schema_extra or {}
        if unwrapped(info.annotation) is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # as the recipe holds it
        return RecipeError(f"{key}: {extra.get('say') or 'must be ' + extra['must']}, got {short(value)}")
    if kind == "recipe":  # a rule across fields: its message names the keys
        return RecipeError(first["msg"])
    return RecipeError(f"{key}: {short(value)} {first['msg']}" if kind == "too_large" else f"{key}: {first['msg']}")

