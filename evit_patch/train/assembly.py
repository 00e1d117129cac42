"""A recipe's model, ready to train or rebuilt from a finished run, with its method in place."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from evit_patch.train.checkpoint import load_weights
from evit_patch.train.methods import recipe_method
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import ModelConfig, Recipe, RecipeError
from evit_patch.train.schedule import keep_rate_at


def prepare_model(recipe: Recipe) -> nn.Module:
    """The recipe's starting model with its method applied; a token reducer starts at the
    keep-rate schedule's first rate, and an oracle defaults to these starting weights."""
    model = build_model(recipe.model)
    schedule = recipe.keep_rate_schedule
    start = keep_rate_at(0.0, recipe.reduction.keep_rate, schedule.kind, schedule.start_epoch, schedule.epochs)
    return recipe_method(recipe).apply(model, recipe, start, model)


def rebuild(recipe: Recipe, weights: Path) -> nn.Module:
    """A finished run's model in eval mode: the recipe's architecture, its method, and the
    saved weights (loaded after a method that changes the architecture, such as width
    pruning to the recorded ``structural.shape`` or DynamicViT's predictors, else before
    the method goes on)."""
    method = recipe_method(recipe)
    if method.name == "width-pruning" and recipe.structural.shape is None:
        raise RecipeError("structural.shape: a width-pruned run's recipe.yaml records the widths it was "
                          "pruned to; rebuild from that file")
    model = build_model(ModelConfig(name=recipe.model.name, kwargs=recipe.model.kwargs, source=recipe.model.source))
    if method.changes_architecture:
        method.apply(model, recipe, None, None)
    load_weights(model, weights)
    if not method.changes_architecture:
        method.apply(model, recipe, None, None)
    return model.eval()
