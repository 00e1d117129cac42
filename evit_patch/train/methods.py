"""Every method a recipe can run, as tables and training know it.

The token methods are the registry's (:mod:`evit_patch.reducers.registry`), each applied
the same way; beside them stand the plain model, DynamicViT (learned predictors) and width
pruning, which are not reducers at EViT's insertion point. Fine-tuning, ``evaluate``,
``benchmarks/compare.py`` and the README tables read :data:`METHODS`.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

from torch import nn

from evit_patch.core.token_patch import apply_token_reducer
from evit_patch.cost import count_macs
from evit_patch.dynamicvit import apply_dynamicvit
from evit_patch.reducers import TokenReducer, apply_evit
from evit_patch.reducers.registry import TokenMethod, selected_method, token_methods
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
        selection: ``--set`` overrides that select it on any recipe.
        changes_architecture: it adds or removes parameters, so a saved run's weights
            load only after it is applied (else before).
        meaningful_untrained: its accuracy before any fine-tuning tells something.
        apply: puts the method on a model.
    """

    name: str
    label: str
    selection: tuple[str, ...]
    changes_architecture: bool
    meaningful_untrained: bool
    apply: Apply


def _unchanged(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
               starting_model: Optional[nn.Module]) -> nn.Module:
    return model


def recipe_token_method(recipe: Recipe) -> TokenMethod:
    """The registered token method of the recipe's ``reduction`` section (its name, or the form of
    it that the options select: ``fuse: false``, ``variant: training-free``)."""
    return selected_method(recipe.reduction.method, recipe.reduction.model_dump())


def recipe_reducer(recipe: Recipe, starting_model: Optional[nn.Module] = None) -> TokenReducer:
    """The recipe's token method with its options. A method that needs an oracle reads
    ``recipe.oracle``, else the recipe's starting weights (``starting_model`` when given,
    before any training)."""
    method = recipe_token_method(recipe)
    needs = {}
    if "oracle" in method.needs:
        needs["oracle"] = starting_model if recipe.oracle is None and starting_model is not None else build_model(
            recipe.oracle or recipe.model)
    if "layers" in method.needs:
        needs["layers"] = recipe.reduction.layers
    return method.build(recipe.reduction.model_dump(), **needs)


def _token_reducer(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
                   starting_model: Optional[nn.Module]) -> nn.Module:
    """The recipe's reducer at its layers (keep rate: the recipe's target unless given,
    e.g. the start of a warm-down schedule)."""
    rate = recipe.reduction.keep_rate if keep_rate is None else keep_rate
    return apply_token_reducer(model, recipe.reduction.layers, rate, recipe_reducer(recipe, starting_model))


def _dynamicvit(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
                starting_model: Optional[nn.Module]) -> nn.Module:
    return apply_dynamicvit(model, recipe.dynamicvit.layers, recipe.dynamicvit.keep_rate)


def _width_pruning(model: nn.Module, recipe: Recipe, keep_rate: Optional[float],
                   starting_model: Optional[nn.Module]) -> nn.Module:
    """Prune heads and MLP channels to ``structural.shape``, else to ``target_macs``, else
    to the cost of EViT at ``reduction.layers``/``reduction.keep_rate``; the widths are recorded in
    ``structural.shape``, so the run's recipe.yaml rebuilds this architecture."""
    structural = recipe.structural
    try:
        if structural.shape is not None:
            apply_pruned_shape(model, structural.shape.model_dump(), importance=structural.importance)
        else:
            target = structural.target_macs
            if target is None:
                reduction = recipe.reduction
                target = count_macs(apply_evit(copy.deepcopy(model), reduction.layers, reduction.keep_rate, fuse=reduction.fuse))
            prune_to_macs(model, target, importance=structural.importance)
    except ValueError as error:
        raise RecipeError(f"structural: {error}") from error
    structural.shape = PrunedShapeConfig(**pruned_shape(model))
    return model


def _token_method(method: TokenMethod) -> Method:
    return Method(method.name, method.label, (f"reduction.method={method.name}",), method.changes_architecture,
                  method.meaningful_untrained, _token_reducer)


_UNPATCHED = Method("unpatched", "unpatched", ("reduction.enabled=false",), False, True, _unchanged)
_OTHERS = [
    Method("dynamicvit", "DynamicViT", ("reduction.enabled=false", "dynamicvit.enabled=true"),
           True, False, _dynamicvit),
    Method("width-pruning", "width pruning", ("structural.enabled=true",), True, True, _width_pruning),
]


class _Methods(Mapping[str, Method]):
    """The plain model, every registered token method (as registered now), DynamicViT and width pruning."""

    def _all(self) -> dict[str, Method]:
        methods = [_UNPATCHED, *(_token_method(method) for method in token_methods().values()), *_OTHERS]
        return {method.name: method for method in methods}

    def __getitem__(self, name: str) -> Method:
        methods = self._all()
        if name not in methods:
            close = difflib.get_close_matches(str(name), list(methods), n=1)
            raise KeyError(f"no method {name!r}" + (f"; did you mean {close[0]!r}?" if close else f"; methods: {list(methods)}"))
        return methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


METHODS: Mapping[str, Method] = _Methods()


def recipe_method(recipe: Recipe) -> Method:
    """The method a recipe runs (its sections say which; the recipe loader lets only one be on)."""
    if recipe.structural.enabled:
        return METHODS["width-pruning"]
    if recipe.dynamicvit.enabled:
        return METHODS["dynamicvit"]
    if not recipe.reduction.enabled:
        return _UNPATCHED
    return _token_method(recipe_token_method(recipe))


def method_label(recipe: Recipe) -> Optional[str]:
    """A table label for the recipe's method with its setting, e.g. ``EViT keep 0.7``
    (None: the plain model)."""
    method = recipe_method(recipe)
    if method.name == "unpatched":
        return None
    if method.name == "width-pruning":
        return "width-pruned"
    if method.name == "dynamicvit":
        return f"{method.label} keep rate {recipe.dynamicvit.keep_rate}"
    return f"{method.label} keep {recipe.reduction.keep_rate}"


def runs_on_fewer_tokens(recipe: Recipe) -> bool:
    """Whether the recipe's method runs the model's own weights on fewer tokens (so the
    same weights unpatched are its baseline): a token method or DynamicViT."""
    return recipe_method(recipe).name not in ("unpatched", "width-pruning")
