"""The token reducer a recipe asks for, applied the same way by training and evaluation."""

from __future__ import annotations

from typing import Optional

from torch import nn

from evit_patch.config import Recipe
from evit_patch.patch import apply_token_reducer
from evit_patch.reducers import EvitReducer, OracleGuided, RandomDrop, ToMeMerge, TokenReducer
from evit_patch.training import build_model


def recipe_reducer(recipe: Recipe, starting_model: nn.Module | None = None) -> TokenReducer:
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
    return EvitReducer(config.fuse)


def apply_recipe_reducer(model: nn.Module, recipe: Recipe, keep_rate: float | None = None,
                         starting_model: nn.Module | None = None) -> nn.Module:
    """Patch ``model`` with the recipe's reducer at its layers (keep rate: the recipe's
    target unless given, e.g. the start of a warm-down schedule)."""
    rate = recipe.evit.keep_rate if keep_rate is None else keep_rate
    return apply_token_reducer(model, recipe.evit.layers, rate, recipe_reducer(recipe, starting_model))


def method_label(recipe: Recipe) -> Optional[str]:
    """A table label for the recipe's method, e.g. ``EViT keep 0.7`` (None: the plain model)."""
    if recipe.structural.enabled:
        return "width-pruned"
    if recipe.dynamicvit.enabled:
        return f"DynamicViT keep ratio {recipe.dynamicvit.keep_ratio}"
    if not recipe.evit.enabled:
        return None
    config = recipe.evit
    names = {"evit": "EViT" if config.fuse else "EViT w/o fusion", "random": "random drop",
             "tome": "ToMe-style merging", "oracle": "oracle-guided EViT"}
    return f"{names[config.reducer]} keep {config.keep_rate}"
