"""What a resumed run may change in its recipe, and what it may not.

A checkpoint stores the recipe it was trained with; ``--resume`` compares it with the
recipe given now, key by key, before any data or model is built:

- what the run *is* may not change: the model, the method and its settings (``reduction``,
  ``dynamicvit``, ``structural``, ``keep_rate_schedule``, the oracle), the data and its
  augmentation, the batch size and steps per epoch (which give the position its
  meaning), the seed, the EMA, the optimizer, the teacher and token labeling. Any such
  change is refused, naming every changed key.
- how long and how hard it trains may: ``train.epochs``, the learning rates, warm-up,
  the schedule's stepping (per update or epoch, min lr scaled or not, warm-up prefix),
  weight decay (between non-zero values: turning it on or off regroups the optimizer's
  parameters), gradient clipping and ``train.amp``. The lr schedule is a function of the
  recipe and the update count, so from the resumed update on the lr is the one a fresh
  run of the new recipe has at that update (a 1-epoch run resumed with
  ``train.epochs: 3`` climbs back from its minimum lr to the 3-epoch cosine at update
  ``steps_per_epoch``). Every other optimizer setting follows the new recipe too.
- where things are and how evaluation runs may: the output folder, evaluation batch
  sizes, data workers, the data root, the evaluation split, subset and crop, and weight-file
  paths (taken to be the same files, moved).

Every allowed change is named in a warning with what it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evit_patch.train.recipe import PrunedShapeConfig, Recipe, RecipeError, recipe_to_dict, reduces_tokens, with_current_names
from evit_patch.train.recipe_errors import unwrapped


def _may_change() -> dict[str, str]:
    """``{key: what changing it does}`` from the schema's fields (their ``may_change``, one
    text or one per section of the same type)."""
    allowed: dict[str, str] = {}
    for section, info in Recipe.model_fields.items():
        model = unwrapped(info.annotation)
        for name, item in getattr(model, "model_fields", {}).items():
            text = (item.json_schema_extra or {}).get("may_change")
            text = text.get(section) if isinstance(text, dict) else text
            if text:
                allowed[f"{section}.{name}"] = text
    return allowed


MAY_CHANGE: dict[str, str] = _may_change()
"""Recipe keys a resume may change, with what the change does."""

_ABSENT = "absent"


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; an empty mapping or None stays a leaf."""
    if isinstance(values, dict) and values:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: values}


def _leaf_above(key: str, flat: dict[str, Any]) -> str | None:
    """The part of ``key`` that is a leaf of ``flat`` (``teacher`` for ``teacher.name``
    when the teacher is null there)."""
    parts = key.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in flat), None)


def recipe_changes(saved: dict, recipe: Recipe) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs between a checkpoint's recipe and ``recipe``:
    ``{key: (in the checkpoint, now)}``. A key only one side knows counts when it sits in
    ``kwargs`` or under a section the other side leaves empty; otherwise it is a key this
    version added or dropped, and its default holds."""
    old, new = _flatten(saved), _flatten(recipe_to_dict(recipe))
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(old.keys() | new.keys(), key=str):
        if key in old and key in new:
            if old[key] != new[key]:
                changes[key] = (old[key], new[key])
            continue
        side, other = (old, new) if key in old else (new, old)
        above = _leaf_above(key, other)
        if above is not None:
            section = {k[len(above) + 1:]: v for k, v in side.items() if k.startswith(above + ".")}
            changes[above] = (section, other[above]) if side is old else (other[above], section)
        elif ".kwargs." in f".{key}":
            changes[key] = (old.get(key, _ABSENT), new.get(key, _ABSENT))
    return changes


def adopt_recorded_values(saved: dict, recipe: Recipe) -> None:
    """Values a run recorded in its recipe for itself: the widths a width-pruned run found
    (``structural.shape``), which a resume of the same recipe must rebuild exactly."""
    shape = (saved.get("structural") or {}).get("shape")
    if recipe.structural.enabled and recipe.structural.shape is None and isinstance(shape, dict):
        recipe.structural.shape = PrunedShapeConfig(**shape)


def check_resume(state: dict, recipe: Recipe, source: Path) -> list[str]:
    """Refuse a resume that changes what the run is, or leaves nothing to train; return
    one warning per allowed change."""
    position = state["position"]
    finished = position.get("epoch", 0) if isinstance(position, dict) else 0
    if finished >= recipe.train.epochs:
        raise RecipeError(
            f"train.epochs: the checkpoint {str(source)!r} has finished {finished} epoch(s), and train.epochs is "
            f"{recipe.train.epochs}: nothing is left to train; to train longer, --set train.epochs=N with N > {finished}")
    saved = state.get("recipe")
    if not isinstance(saved, dict):
        return [f"--resume {str(source)!r} stores no recipe to compare with; the run continues with this one"]
    saved = with_current_names(saved)  # a checkpoint of an earlier version: its keys as named now
    adopt_recorded_values(saved, recipe)
    changes = recipe_changes(saved, recipe)
    oracle_is_start = reduces_tokens(recipe) and recipe.reduction.method == "oracle" and recipe.oracle is None
    refused = {key: values for key, values in changes.items()
               if key not in MAY_CHANGE or (oracle_is_start and key.startswith("model."))}  # the oracle's weights
    if refused:
        listed = ", ".join(f"{key} ({_shown(old)} there, {_shown(new)} here)" for key, (old, new) in refused.items())
        model = (saved.get("model") or {}).get("name", "?") if isinstance(saved.get("model"), dict) else "?"
        raise RecipeError(
            f"--resume {str(source)!r} is a training checkpoint of {model}, and this recipe changes {listed}; a "
            "resumed run keeps its model, method, data, batch and seed: resume with the recipe it was written with "
            "(the run's recipe.yaml), or start a new run in another train.output_dir")
    decay = changes.get("optimizer.weight_decay")
    if decay is not None and (decay[0] == 0) != (decay[1] == 0):
        raise RecipeError(
            f"optimizer.weight_decay: {decay[0]} in the checkpoint {str(source)!r}, {decay[1]} here; turning weight "
            "decay on or off changes the optimizer's parameter groups, so its state cannot be resumed: change it "
            "between non-zero values only, or start a new run")
    update = position.get("global_step", 0) if isinstance(position, dict) else 0
    return [f"resuming with {key} changed from {_shown(old)} to {_shown(new)}: {MAY_CHANGE[key].format(update=update)}"
            for key, (old, new) in changes.items()]


def _shown(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."
