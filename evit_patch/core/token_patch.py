"""apply_token_reducer / remove_evit / set_keep_rate: the model surgery every reducer shares."""

from __future__ import annotations

from typing import Sequence, TypeVar

from torch import nn

from evit_patch.core.arguments import validated_placement
from evit_patch.core.key_weighting import weighted_key_attention
from evit_patch.core.lifecycle import attach, check_unpatched, detach, patch_state
from evit_patch.core.model_info import ModelFamily, family_of, model_name, prefix_token_count, score_mode, transformer_blocks
from evit_patch.core.positions import ATTENTION_BIAS, POSITION_RULES, MixableInput, PositionRule, SequenceInput
from evit_patch.core.reduction import TokenReducer
from evit_patch.core.reorganizer import FollowedInput, ReductionState, TokenReorganizer
from evit_patch.errors import UnsupportedModelError

ModelT = TypeVar("ModelT", bound=nn.Module)


def reduction_state(model: nn.Module) -> ReductionState:
    """The shared state of a model patched with a token reducer; a clear error otherwise."""
    return patch_state(model, ReductionState, "is not patched with a token reducer; call "
                                              "apply_evit(model, layers, keep_rate) first")


def apply_token_reducer(model: ModelT, layers: Sequence[int] | None, keep_rate: float | Sequence[float],
                        reducer: TokenReducer) -> ModelT:
    """Patch ``model`` in place with any token reducer at EViT's insertion point.

    ``reducer`` is one of :mod:`evit_patch.reducers` (EViT with or without fusion,
    random drop, ToMe-style merging, oracle-guided EViT); ``layers`` (None: the paper's
    placement for the model's depth) and ``keep_rate`` mean what they mean for
    :func:`evit_patch.apply_evit`, so methods compare at equal token counts. No parameter or buffer is added; on any error the model is left
    exactly as it was.
    """
    check_unpatched(model)
    if not isinstance(reducer, TokenReducer):
        raise TypeError(f"reducer must be a TokenReducer from evit_patch.reducers, got {type(reducer).__name__}")
    name = model_name(model)
    family = family_of(model)
    blocks = transformer_blocks(model)
    layers, keep_rates = validated_placement(layers, keep_rate, len(blocks))
    if reducer.key_weights is not None and not family.key_weighting:
        raise UnsupportedModelError(name, f"reducer {reducer.describe()} weights attention keys, which "
                                    f"{family.name} attention does not take; use it without key weights")
    inputs = family.sequence_inputs(model)
    positions = {name: follow for name, follow in inputs.items() if follow is not None}
    state = ReductionState(layers, keep_rates, reducer, prefix_token_count(model), score_mode(model),
                           positions=positions, position_rule=_default_position_rule(reducer, positions))
    for position, index in enumerate(layers):
        reorganizer = TokenReorganizer(state, position).train(blocks[index].training)
        followers = {follower.name: follower for follower in state.followers(position, reorganizer)}
        state.patched_blocks[index] = family.rewrite_block(blocks[index], reorganizer, name,
                                                           {**dict.fromkeys(inputs), **followers})
    state.original_blocks = {index: blocks[index] for index in layers}
    if ATTENTION_BIAS in state.positions:
        _follow_attention_bias(blocks, state, name, family)
    if reducer.key_weights is not None:
        _weight_attention_keys(blocks, state, name, family)
    return attach(model, state)


def _follow_attention_bias(blocks: nn.Sequential | nn.ModuleList, state: ReductionState, name: str,
                           family: ModelFamily) -> None:
    """The attentions after the first reduction layer compute (or are handed) the bias of the full sequence:
    those of blocks not rewritten are swapped for the family's copies whose bias follows the tokens their
    block holds (the rewritten blocks' scored attentions have their own follower)."""
    reorganizer = state.reorganizers()[0]
    live = tuple(input_name for input_name in state.positions if input_name != ATTENTION_BIAS)
    for index in range(state.layers[0] + 1, len(blocks)):
        if index not in state.patched_blocks:
            follower = FollowedInput(reorganizer, state.stage_of(index), ATTENTION_BIAS)
            attention = getattr(blocks[index], family.attention_name)
            state.original_attentions[index] = attention
            state.weighted_attentions[index] = family.bias_following_attention(attention, follower, name, live)


def _weight_attention_keys(blocks: nn.Sequential | nn.ModuleList, state: ReductionState, name: str,
                           family: ModelFamily) -> None:
    """Every attention from the first reduction layer on reads the reducer's key weights
    (e.g. token sizes for proportional attention): the reducing blocks' own rewritten
    attention, and the other blocks' attention swapped for a weighted copy."""
    patched = state.patched_blocks
    for index in range(state.layers[0], len(blocks)):
        owner = patched.get(index, blocks[index])
        own = getattr(owner, family.attention_name)
        attention = own if index in patched else state.weighted_attentions.get(index, own)
        weighted = weighted_key_attention(attention, state.reducer.key_weights, name, tuple(state.positions))
        if index in patched:
            setattr(owner, family.attention_name, weighted)
        else:
            state.original_attentions.setdefault(index, own)
            state.weighted_attentions[index] = weighted


def remove_evit(model: ModelT) -> ModelT:
    """Take whatever token method is on ``model`` off: EViT, any registered token method
    (random drop, ToMe-style merging, the oracle, ...) or DynamicViT, whichever patched it.
    The model then computes exactly as never patched (with its weights as they are now).
    The name is EViT's, the package's first method; it removes every method."""
    return detach(model)


def set_keep_rate(model: nn.Module, keep_rate: float | Sequence[float]) -> None:
    """Change the keep rate of a patched model at run time (cheap: no re-patching)."""
    reduction_state(model).set_keep_rates(keep_rate)


def _default_position_rule(reducer: TokenReducer, positions: dict[str, SequenceInput]) -> PositionRule:
    """The reducer's own rule where every position input can take it (``members`` needs a mean
    of several positions), else ``representative``."""
    if reducer.position_rule == "members" and _unmixable(positions):
        return "representative"
    return reducer.position_rule


def _unmixable(positions: dict[str, SequenceInput]) -> list[str]:
    """The kinds of ``positions`` that have no mean of several positions."""
    return [position.kind for position in positions.values() if not isinstance(position, MixableInput)]


def set_position_rule(model: nn.Module, rule: PositionRule) -> None:
    """Where a token that stands for several sits in a model whose positions follow the kept
    tokens: ``representative``, ``members`` or ``top-member`` (see docs/positions.md). The
    default is the reducer's: ``members`` for merged tokens (ToMe-style, training-free) where
    the positions allow it, ``representative`` otherwise. ``top-member`` places a token by one
    origin, as ``representative`` does, so every input that follows the kept tokens (a
    relative bias too) takes it."""
    if rule not in POSITION_RULES:
        raise ValueError(f"position rule {rule!r} is not one of {', '.join(POSITION_RULES)}; pass one of those")
    state = reduction_state(model)
    unmixed = _unmixable(state.positions)
    if rule == "members" and unmixed:
        raise ValueError(f"{model_name(model)} has {unmixed[0]}, which has no mean of several positions; "
                         "keep the position rule 'representative'")
    state.position_rule = rule
