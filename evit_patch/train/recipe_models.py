"""Recipe checks that ask timm: model and optimizer names it knows, and each method's layers
against the depth of the model built on the meta device (no memory, no download), all
before any data is loaded."""

from __future__ import annotations

from typing import Optional

import timm
import timm.optim
import torch
from torch import nn

from evit_patch.core.arguments import validated_layers
from evit_patch.train.messages import RecipeError, closest, one_line, short
from evit_patch.train.recipe_files import check_output_dir
from evit_patch.train.recipe_schema import Recipe, reduces_tokens
from evit_patch.train.recipe_sections import ModelConfig, TeacherConfig

_DEPTHS: dict[tuple[str, str], Optional[int]] = {}  # (timm name, repr of kwargs) -> number of blocks


def check_values(recipe: Recipe) -> None:
    """The model and optimizer names known to timm, the output folder usable, and each method's
    layers against the model's depth (and the oracle's): all before any data or model is built."""
    _check_optimizer_name(recipe.optimizer.name)
    check_output_dir(recipe.train.output_dir)
    for section in ("model", "teacher", "oracle"):
        config = getattr(recipe, section)
        if config is not None:
            _check_model_name(section, config.name, getattr(config, "source", "timm"))
    depth = _model_depth("model", recipe.model)
    if recipe.teacher is not None:
        _model_depth("teacher", recipe.teacher)  # its kwargs, before data is loaded for it
    oracle_depth = _model_depth("oracle", recipe.oracle) if recipe.oracle is not None else None
    structural, layers = recipe.structural, recipe.reduction.layers
    if reduces_tokens(recipe) or (structural.enabled and structural.shape is None and structural.target_macs is None):
        _check_layers("reduction", layers, depth)
        if reduces_tokens(recipe) and recipe.reduction.method == "oracle" and oracle_depth is not None \
                and max(layers) >= oracle_depth:
            raise RecipeError(f"reduction.layers: the oracle is read at the same blocks, and oracle.name "
                              f"{recipe.oracle.name!r} has blocks 0..{oracle_depth - 1}, not {max(layers)}")
    if recipe.dynamicvit.enabled:
        _check_layers("dynamicvit", recipe.dynamicvit.layers, depth)
    if structural.shape is not None and depth is not None:
        for key in ("heads", "mlp_hidden"):
            widths = getattr(structural.shape, key)
            if len(widths) != depth or not all(width >= 1 for width in widths):
                raise RecipeError(f"structural.shape.{key}: must list one width >= 1 per block ({depth} blocks), "
                                  f"got {short(widths)}")


def _check_layers(section: str, layers: list[int], depth: Optional[int]) -> None:
    """The layer checks ``apply_evit`` and ``apply_dynamicvit`` make (None: not a ViT with
    ``blocks``, and applying the method names the reason)."""
    if depth is None:
        return
    try:
        validated_layers(layers, depth)
    except (TypeError, ValueError) as error:
        text = one_line(error)
        raise RecipeError(f"{section}.layers: {text.removeprefix('layers: ').removeprefix('layers ')}") from None


def _check_optimizer_name(name: str) -> None:
    """timm's optimizer names, with its optional ``lookahead_`` prefix."""
    base = name.lower().split("_")[-1]
    known = timm.optim.list_optimizers()
    if base not in known:
        close = closest(base, known)
        hint = f"; did you mean {close!r}?" if close else "; see timm.optim.list_optimizers()"
        raise RecipeError(f"optimizer.name: timm has no optimizer {short(name)}{hint}")


def _check_model_name(section: str, name: str, source: str = "timm") -> None:
    if source == "transformers" or timm.is_model(name):  # a transformers name is checked with its config
        return
    close = closest(name, timm.list_models())
    hint = f"; did you mean {close!r}?" if close else "; see timm.list_models()"
    raise RecipeError(f"{section}.name: timm has no model {short(name)}{hint}")


def _model_depth(section: str, config: ModelConfig | TeacherConfig) -> Optional[int]:
    """How many transformer blocks the section's model has (None: no ``blocks``).

    The model is built on the meta device, so no memory is allocated and nothing is
    downloaded; a constructor that cannot run there is built on the CPU instead. Bad
    ``kwargs`` show here, before any data is loaded.
    """
    if getattr(config, "source", "timm") == "transformers":
        return _transformers_depth(section, config)
    key = (config.name, repr(config.kwargs))
    if key not in _DEPTHS:
        if not all(isinstance(name, str) for name in config.kwargs):
            raise RecipeError(f"{section}.kwargs: keys must be keyword names, got {short(list(config.kwargs))}")
        try:
            with torch.device("meta"):
                model = timm.create_model(config.name, **config.kwargs)
        except Exception:  # a constructor that needs real tensors; the CPU build says what is wrong
            try:
                model = timm.create_model(config.name, **config.kwargs)
            except Exception as error:  # timm and model constructors raise anything on bad kwargs
                raise RecipeError(f"{section}.kwargs: timm cannot build {config.name!r} with {short(config.kwargs)} "
                                  f"({type(error).__name__}: {short(str(error), 160, quote=False)})") from None
        blocks = getattr(model, "blocks", None)
        _DEPTHS[key] = len(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else None
    return _DEPTHS[key]


def _transformers_depth(section: str, config: ModelConfig) -> int:
    """The layer count of a transformers model, from its config alone (no weights are read)."""
    from evit_patch.train.transformers_source import transformers_config

    if config.pretrained or config.pretrained_file:
        raise RecipeError(f"{section}.pretrained: a transformers model's weights come from its checkpoint folder; "
                          f"set {section}.name to the folder (save_pretrained) and drop pretrained / pretrained_file")
    try:
        return int(transformers_config(config.name, config.kwargs).num_hidden_layers)
    except ValueError as error:
        raise RecipeError(f"{section}.{one_line(error)}") from None


