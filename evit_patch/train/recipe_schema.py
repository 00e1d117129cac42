"""The recipe schema: its sections, the token method's section built from the method registry,
and the rules across sections. Checks that need the file system or timm are elsewhere
(:mod:`evit_patch.train.recipe_files`, :mod:`evit_patch.train.recipe_models`)."""

from __future__ import annotations

import dataclasses
import functools
import typing
import warnings
from typing import Any, Optional

from pydantic import Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from evit_patch.core.arguments import validated_keep_rates
from evit_patch.models import DEFAULT_EVIT_LAYERS
from evit_patch.reducers.registry import token_method, token_methods
from evit_patch.train.messages import one_line
from evit_patch.train.recipe_sections import (
    DataConfig,
    DynamicViTConfig,
    KeepRates,
    KeepRateScheduleConfig,
    ModelConfig,
    OptimizerConfig,
    Real,
    Section,
    StructuralConfig,
    TeacherConfig,
    TokenLabelingConfig,
    TrainConfig,
    ranged,
    refuse,
)


class ReductionConfig(Section):
    """The token method at these layers and counts. Its options (``fuse``, ``seed``, ...) are
    fields that :func:`recipe_schema` adds, one for each option of a registered method."""

    enabled: bool = True
    layers: list[int] = Field(default_factory=lambda: [3, 6, 9])
    keep_rate: KeepRates = 0.7  # one for every layer, or one per layer (as evit-tune may choose)
    method: str = "evit"  # a registered token method (evit_patch.reducers.registry)

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        try:
            token_method(name)
        except ValueError as error:
            raise PydanticCustomError("keyed", one_line(error)) from None
        return name

    @model_validator(mode="after")
    def _variant_of_evit(self) -> "ReductionConfig":
        variant = getattr(self, "variant", "paper")
        if variant == "paper":
            return self
        if self.method != "evit":
            raise refuse(f"reduction.variant: {variant!r} is a form of reducer evit, not of {self.method!r}; "
                         "set reduction.method: evit, or drop reduction.variant")
        try:
            token_method("evit").options(fuse=getattr(self, "fuse", True), variant=variant)
        except ValueError as error:
            raise refuse(f"reduction.variant: {one_line(error)}; drop reduction.fuse: false, or use "
                         "reduction.variant: paper") from None
        return self


class Recipe(Section):
    """A fine-tuning recipe. Only one method prunes: the ``reduction`` section's token method,
    DynamicViT, or width pruning (``structural``, which runs without the token method)."""

    model: ModelConfig
    reduction: ReductionConfig = Field(default_factory=lambda: recipe_schema().model_fields["reduction"].annotation())
    dynamicvit: DynamicViTConfig = Field(default_factory=DynamicViTConfig)
    keep_rate_schedule: KeepRateScheduleConfig = Field(default_factory=KeepRateScheduleConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher: Optional[TeacherConfig] = None
    oracle: Optional[ModelConfig] = None  # method oracle: the trained model that scores tokens (default: `model`)
    structural: StructuralConfig = Field(default_factory=StructuralConfig)
    token_labeling: TokenLabelingConfig = Field(default_factory=TokenLabelingConfig)

    @property
    def evit(self) -> ReductionConfig:
        """The former name of :attr:`reduction` (deprecated; warns)."""
        warnings.warn("Recipe.evit is now Recipe.reduction (it configures any token method); evit goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return self.reduction

    @model_validator(mode="after")
    def _rules_across_sections(self) -> "Recipe":
        if self.dynamicvit.enabled and self.reduction.enabled:
            raise refuse("dynamicvit.enabled and reduction.enabled are both true; a run prunes with one method: "
                         "set reduction.enabled: false (or dynamicvit.enabled: false)")
        if reduces_tokens(self) and self.reduction.method == "oracle" and self.oracle is None \
                and not self.model.has_trained_weights():
            raise refuse("reduction.method: oracle needs a trained oracle: add an `oracle:` section (name and "
                         "checkpoint / pretrained_file), or start `model` from trained weights, which then "
                         "serve as the oracle")
        _check_token_labeling(self)
        structural = self.structural
        if reduces_tokens(self) or (structural.enabled and structural.shape is None and structural.target_macs is None):
            _check_keep_rate("reduction", self.reduction.keep_rate, len(self.reduction.layers))
        if self.dynamicvit.enabled:
            _check_keep_rate("dynamicvit", self.dynamicvit.keep_rate)
        return self


def reduces_tokens(recipe: Recipe) -> bool:
    """Whether the recipe runs its ``reduction`` section's token method: enabled, and not
    replaced by width pruning (``structural.enabled``), which runs without it."""
    return recipe.reduction.enabled and not recipe.structural.enabled


def _check_keep_rate(section: str, rate: float | list[float], layers: int = 1) -> None:
    """The keep-rate check the methods themselves make (one rate, or one per layer), naming the key."""
    try:
        validated_keep_rates(rate, layers)
    except (TypeError, ValueError) as error:
        text = one_line(error)
        raise refuse(f"{section}.keep_rate: {text.removeprefix('keep_rate: ').removeprefix('keep_rate ')}") from None


def _check_token_labeling(recipe: Recipe) -> None:
    """Token labeling needs LV-ViTs on both sides and a teacher with trained weights: its
    per-token predictions are the labels, so a missing or untrained one is refused."""
    if not recipe.token_labeling.enabled:
        return
    lvvits = sorted(DEFAULT_EVIT_LAYERS)  # one entry per LV-ViT variant
    named = ", ".join(lvvits)
    teacher = recipe.teacher
    if recipe.model.name.split(".")[0] not in lvvits:
        raise refuse(f"token_labeling: model.name {recipe.model.name!r} has no token-labeling head; "
                     f"use an LV-ViT ({named}) or set token_labeling.enabled: false")
    if teacher is None:
        raise refuse("token_labeling: token labels come from a teacher, and the recipe has none; add a "
                     f"'teacher' section: an unpatched LV-ViT ({named}) with trained weights")
    if teacher.name.split(".")[0] not in lvvits:
        raise refuse(f"token_labeling: teacher.name {teacher.name!r} gives no per-token predictions; use an LV-ViT ({named})")
    if not teacher.has_trained_weights():
        raise refuse("token_labeling: the teacher has no trained weights, so its token labels would be "
                     "noise; set teacher.checkpoint or teacher.pretrained_file")


def _option_field(hint: Any, item: dataclasses.Field) -> tuple[Any, Any]:
    """A registered method's option as a pydantic field: its type, default and any range in its metadata."""
    metadata = dict(item.metadata)
    must = metadata.pop("must", None)
    hint = Real if hint is float else hint
    if must is None:
        return hint, Field(item.default)
    return hint, ranged(item.default, must, **metadata)


@functools.lru_cache(maxsize=None)
def _schema_for(options: tuple[tuple[str, Any, Any], ...]) -> type[Recipe]:
    fields = {name: _option_field(hint, item) for name, hint, item in options}
    reduction = create_model("ReductionConfig", __base__=ReductionConfig, **fields)
    return create_model("Recipe", __base__=Recipe, reduction=(reduction, Field(default_factory=reduction)))


def recipe_schema() -> type[Recipe]:
    """:class:`Recipe` with a ``reduction`` field for each option of each method registered now."""
    options: dict[str, tuple[str, Any, Any]] = {}
    for method in token_methods().values():
        hints = typing.get_type_hints(method.options)
        for item in method.option_fields():
            options.setdefault(item.name, (item.name, hints[item.name], item))
    return _schema_for(tuple(options.values()))
