"""One patch lifecycle for every token method: attach, probe, roll back, remove.

A token method (a reducer at EViT's insertion point, DynamicViT's predictors) describes
what it changes on a model as a :class:`PatchState`: how to install itself and how to
take itself out again. This module owns everything around that: one patch per model,
a test forward with tokens really dropped, the rollback that leaves a model exactly as
it was when that forward fails, and removal. ``is_patched`` and ``remove_evit`` thus
mean the same for every method.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import ContextManager, TypeVar

import torch
from torch import nn

from evit_patch.core.eval_mode import eval_mode
from evit_patch.core.model_info import example_images, model_name, native_input_shape
from evit_patch.errors import UnsupportedModelError

STATE_ATTRIBUTE = "evit_state"
"""The attribute a patched model carries its state under (not a submodule: no ``state_dict`` key)."""

ModelT = TypeVar("ModelT", bound=nn.Module)
StateT = TypeVar("StateT", bound="PatchState")


class PatchState(ABC):
    """What one token method keeps on a patched model, and how it goes in and out."""

    method = "a token method"
    """How errors name the method, e.g. ``"EViT"``."""
    removal = "remove_evit(model)"
    """The call that takes this method off a model."""

    @abstractmethod
    def install(self, model: nn.Module) -> None:
        """Swap the method's modules and hooks into ``model``."""

    @abstractmethod
    def uninstall(self, model: nn.Module) -> None:
        """Put back exactly what :meth:`install` replaced."""

    def probe_settings(self, model: nn.Module) -> ContextManager[None]:
        """Settings for the test forward that checks a fresh patch (e.g. a keep rate that
        really drops tokens), restored afterwards; it may raise
        :class:`UnsupportedModelError` on what that forward shows."""
        return contextlib.nullcontext()


def attached_state(model: nn.Module) -> PatchState | None:
    """The state of whatever token method patches ``model``, or None."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    return state if isinstance(state, PatchState) else None


def is_patched(model: nn.Module) -> bool:
    """Whether a token method (EViT, any reducer, DynamicViT) patches ``model``."""
    return attached_state(model) is not None


def patch_state(model: nn.Module, state_type: type[StateT], fix: str) -> StateT:
    """The state a method of type ``state_type`` keeps on ``model``; a clear error naming
    ``fix`` when the model is not patched that way."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = attached_state(model)
    if not isinstance(state, state_type):
        other = f" (it is patched with {state.method})" if state is not None else ""
        raise ValueError(f"{model_name(model)}{other} {fix}")
    return state


def check_unpatched(model: nn.Module) -> None:
    """Refuse a model that is not a module or already carries a token method."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a timm ViT), got {type(model).__name__}")
    state = attached_state(model)
    if state is not None:
        raise ValueError(f"{model_name(model)} is already patched with {state.method}; call {state.removal} "
                         "before patching it again")


def attach(model: ModelT, state: PatchState) -> ModelT:
    """Install ``state`` on ``model`` and run one test image through it.

    When the patched model fails and the unpatched one does not, the patch is rolled
    back and :class:`UnsupportedModelError` says why: a model whose later layers cannot
    take a shorter sequence is refused now, not in the middle of training. So is a model
    on which the method's own check of that forward fails.
    """
    check_unpatched(model)
    _install(model, state)
    failure = probe_failure(model, state)
    if failure is None:
        return model
    detach(model)
    if isinstance(failure, UnsupportedModelError):  # the method's own verdict on the test forward
        raise failure
    if probe_failure(model, None) is not None:  # the unpatched model fails too: not ours to judge
        _install(model, state)
        return model
    raise UnsupportedModelError(
        model_name(model), f"the patched model failed a test forward ({type(failure).__name__}: {failure})"
    ) from failure


def _install(model: nn.Module, state: PatchState) -> None:
    state.install(model)
    setattr(model, STATE_ATTRIBUTE, state)


def detach(model: ModelT) -> ModelT:
    """Take the token method off ``model``: it then computes exactly as never patched."""
    state = attached_state(model)
    if state is None:
        raise ValueError(f"{model_name(model)} is not patched; there is nothing to remove")
    state.uninstall(model)
    delattr(model, STATE_ATTRIBUTE)
    return model


def probe_failure(model: nn.Module, state: PatchState | None) -> Exception | None:
    """The error one image through ``model`` in eval mode raises, if any (None too when
    the input shape is unknown or the weights are on the meta device)."""
    parameter = next(model.parameters(), None)
    if native_input_shape(model) is None or parameter is None or parameter.device.type == "meta":
        return None
    image = example_images(model, seed=0)
    settings = state.probe_settings(model) if state is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), eval_mode(model), settings:
            model(image)
    except Exception as error:  # any failure of the model is reported to the caller
        return error
    return None
