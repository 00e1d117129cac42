"""The one registry of methods: what each is called, how a recipe selects it, how it is applied.

Fine-tuning, ``evaluate``, ``benchmarks/compare.py`` and the README tables all read
this table, so a new token method is one entry here plus its reducer.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from evit_patch.core.token_patch import apply_token_reducer
from evit_patch.cost import count_macs
from evit_patch.dynamicvit import apply_dynamicvit
from evit_patch.reducers import EvitReducer, OracleGuided, RandomDrop, TokenReducer, ToMeMerge, TrainingFreeEvit, apply_evit
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import PrunedShapeConfig, Recipe, RecipeError
from evit_patch.width_pruning import apply_pruned_shape, prune_to_macs, pruned_shape

Apply = Callable[[nn.Module, Recipe, Optional[float], Optional[nn.Module]], nn.Module]
"""``apply(model, recipe, keep_rate, starting_model)``: the model with the method in place."""


@dataclass(frozen=True)
class Method:
    """One way of making a model cheaper, as recipes and tables know it.

    Attributes:
        name: the short name (``compare.py --methods``).
        label: the table label, without its budget.
        section: the recipe section that configures it.
        selection: ``--set`` overrides that select it on any recipe.
        changes_architecture: it adds or removes parameters, so a saved run's weights
            load only after it is applied (else before).
        meaningful_untrained: its accuracy before any fine-tuning tells something.
        apply: puts the method on a model.
    """

    name: str
    label: str
    section: str
    selection: tuple[str, ...]
    changes_architecture: bool
    meaningful_untrained: bool
    apply: Apply


def _unchanged(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
               starting_model: Optional[nn.Module]) -> nn.Module:
    return model


def recipe_reducer(recipe: Recipe, starting_model: Optional[nn.Module] = None) -> TokenReducer:
    """The ``evit.reducer`` of a recipe with its options. The oracle is ``recipe.oracle``,
    else the recipe's starting weights (``starting_model`` when given, before any training)."""
    config = recipe.evit
    if config.reducer == "random":
        return RandomDrop(config.seed)
    if config.reducer == "tome":
        return ToMeMerge(config.proportional_attention)
    if config.reducer == "oracle":
        oracle = starting_model if recipe.oracle is None and starting_model is not None else build_model(
            recipe.oracle or recipe.model)
        return OracleGuided(oracle, config.layers, at_eval=config.oracle_at_eval)
    if config.variant == "training-free":
        return TrainingFreeEvit()
    return EvitReducer(config.fuse)


def _token_reducer(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
                   starting_model: Optional[nn.Module]) -> nn.Module:
    """The recipe's reducer at its layers (keep rate: the recipe's target unless given,
    e.g. the start of a warm-down schedule)."""
    rate = recipe.evit.keep_rate if keep_rate is None else keep_rate
    return apply_token_reducer(model, recipe.evit.layers, rate, recipe_reducer(recipe, starting_model))


def _dynamicvit(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
                starting_model: Optional[nn.Module]) -> nn.Module:
    return apply_dynamicvit(model, recipe.dynamicvit.layers, recipe.dynamicvit.keep_ratio)


def _width_pruning(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
                   starting_model: Optional[nn.Module]) -> nn.Module:
    """Prune heads and MLP channels to ``structural.shape``, else to ``target_macs``, else
    to the cost of EViT at ``evit.layers``/``evit.keep_rate``; the widths are recorded in
    ``structural.shape``, so the run's recipe.yaml rebuilds this architecture."""
    structural = recipe.structural
    try:
        if structural.shape is not None:
            apply_pruned_shape(model, dataclasses.asdict(structural.shape), importance=structural.importance)
        else:
            target = structural.target_macs
            if target is None:
                evit = recipe.evit
                target = count_macs(apply_evit(copy.deepcopy(model), evit.layers, evit.keep_rate, fuse=evit.fuse))
            prune_to_macs(model, target, importance=structural.importance)
    except ValueError as error:
        raise RecipeError(f"structural: {error}") from error
    structural.shape = PrunedShapeConfig(**pruned_shape(model))
    return model


METHODS: dict[str, Method] = {method.name: method for method in [
    Method("unpatched", "unpatched", "evit", ("evit.enabled=false",), False, True, _unchanged),
    Method("evit", "EViT", "evit", (), False, True, _token_reducer),
    Method("evit-no-fusion", "EViT w/o fusion", "evit", ("evit.fuse=false",), False, True, _token_reducer),
    Method("evit-training-free", "training-free EViT", "evit", ("evit.variant=training-free",), False, True,
           _token_reducer),
    Method("random", "random drop", "evit", ("evit.reducer=random",), False, True, _token_reducer),
    Method("tome", "ToMe-style merging", "evit", ("evit.reducer=tome",), False, True, _token_reducer),
    Method("oracle", "oracle-guided EViT", "evit", ("evit.reducer=oracle",), False, True, _token_reducer),
    Method("dynamicvit", "DynamicViT", "dynamicvit", ("evit.enabled=false", "dynamicvit.enabled=true"),
           True, False, _dynamicvit),
    Method("width-pruning", "width pruning", "structural", ("structural.enabled=true",), True, True,
           _width_pruning),
]}


def recipe_method(recipe: Recipe) -> Method:
    """The method a recipe runs (its sections say which; the recipe loader lets only one be on)."""
    if recipe.structural.enabled:
        return METHODS["width-pruning"]
    if recipe.dynamicvit.enabled:
        return METHODS["dynamicvit"]
    if not recipe.evit.enabled:
        return METHODS["unpatched"]
    if recipe.evit.reducer == "evit":
        if recipe.evit.variant == "training-free":
            return METHODS["evit-training-free"]
        return METHODS["evit" if recipe.evit.fuse else "evit-no-fusion"]
    return METHODS[recipe.evit.reducer]


def method_label(recipe: Recipe) -> Optional[str]:
    """A table label for the recipe's method with its setting, e.g. ``EViT keep 0.7``
    (None: the plain model)."""
    method = recipe_method(recipe)
    if method.name == "unpatched":
        return None
    if method.name == "width-pruning":
        return "width-pruned"
    if method.name == "dynamicvit":
        return f"{method.label} keep ratio {recipe.dynamicvit.keep_ratio}"
    return f"{method.label} keep {recipe.evit.keep_rate}"


def reduces_tokens(recipe: Recipe) -> bool:
    """Whether the recipe's method runs the model's own weights on fewer tokens (so the
    same weights unpatched are its baseline)."""
    return recipe_method(recipe).name not in ("unpatched", "width-pruning")
