"""apply_evit / remove_evit / set_keep_rate: the model surgery."""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch
from torch import nn

from evit_patch.block_rewrite import reorganizing_block
from evit_patch.errors import UnsupportedModelError
from evit_patch.key_weighting import weighted_key_attention
from evit_patch.inspection import attached_state, model_name, native_input_shape, prefix_token_count, score_mode, transformer_blocks
from evit_patch.modes import eval_mode
from evit_patch.reducers.base import TokenReducer
from evit_patch.reducers.evit import EvitReducer
from evit_patch.state import EvitState, TokenReorganizer
from evit_patch.validation import validated_keep_rates, validated_layers

ModelT = TypeVar("ModelT", bound=nn.Module)
STATE_ATTRIBUTE = "evit_state"


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`apply_evit` has patched ``model``."""
    return isinstance(getattr(model, STATE_ATTRIBUTE, None), EvitState)


def evit_state(model: nn.Module) -> EvitState:
    """The shared state of a patched model; a clear error for an unpatched one."""
    return attached_state(model, STATE_ATTRIBUTE, EvitState,
                          "is not patched; call apply_evit(model, layers, keep_rate) first")


def apply_evit(model: ModelT, layers: Sequence[int], keep_rate: float | Sequence[float], *,
               fuse: bool = True) -> ModelT:
    """Patch ``model`` in place with EViT token reorganization and return it.

    Args:
        model: a timm-style ViT (``blocks``, ``num_prefix_tokens``).
        layers: 0-indexed blocks that reorganize tokens (DeiT: ``[3, 6, 9]``).
        keep_rate: fraction in (0, 1] of image tokens each layer keeps; one float, or
            one per layer.
        fuse: fuse the unkept tokens into one (EViT) or drop them ("EViT w/o fusion").

    No parameter or buffer is added: ``state_dict()`` is unchanged. On any error the
    model is left exactly as it was.
    """
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True or False, got {fuse!r}")
    return apply_token_reducer(model, layers, keep_rate, EvitReducer(fuse))


def apply_token_reducer(model: ModelT, layers: Sequence[int], keep_rate: float | Sequence[float],
                        reducer: TokenReducer) -> ModelT:
    """Patch ``model`` in place with any token reducer at EViT's insertion point.

    ``reducer`` is one of :mod:`evit_patch.reducers` (EViT with or without fusion,
    random drop, ToMe-style merging, oracle-guided EViT); ``layers`` and ``keep_rate``
    mean what they mean for :func:`apply_evit`, so methods compare at equal token counts.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a timm ViT), got {type(model).__name__}")
    if is_patched(model):
        raise ValueError(
            f"{model_name(model)} is already patched; use set_keep_rate(model, rate) to change the rate, "
            "or remove_evit(model) before patching again"
        )
    if hasattr(model, "dynamicvit_state"):  # evit_patch.dynamicvit's mark (importing it here would be circular)
        raise ValueError(f"{model_name(model)} is pruned by DynamicViT; remove_dynamicvit(model) before patching "
                         "it with a token reducer")
    if not isinstance(reducer, TokenReducer):
        raise TypeError(f"reducer must be a TokenReducer from evit_patch.reducers, got {type(reducer).__name__}")
    name = model_name(model)
    blocks = transformer_blocks(model)
    layers = validated_layers(layers, len(blocks))
    keep_rates = validated_keep_rates(keep_rate, len(layers))
    state = EvitState(layers, keep_rates, reducer, prefix_token_count(model), score_mode(model))
    patched = {
        index: reorganizing_block(blocks[index], TokenReorganizer(state, position), name)
        for position, index in enumerate(layers)
    }
    state.original_blocks.update({index: blocks[index] for index in layers})
    if reducer.key_weights is not None:
        _weight_attention_keys(blocks, patched, state, name)
    _install(model, patched, state)
    failure = _probe_failure(model, state)
    if isinstance(failure, UnsupportedModelError):
        remove_evit(model)
        raise failure
    if failure is not None:
        remove_evit(model)
        if _probe_failure(model, None) is None:
            raise UnsupportedModelError(
                name, f"the patched model failed a test forward ({type(failure).__name__}: {failure})"
            ) from failure
        _install(model, patched, state)  # the unpatched model fails on the probe too: not ours to judge
    return model


def _weight_attention_keys(blocks: nn.Sequential | nn.ModuleList, patched: dict[int, nn.Module],
                           state: EvitState, name: str) -> None:
    """Every attention from the first reduction layer on reads the reducer's key weights
    (e.g. token sizes for proportional attention): the reducing blocks' own rewritten
    attention, and the other blocks' attention swapped for a weighted copy."""
    for index in range(state.layers[0], len(blocks)):
        owner = patched.get(index, blocks[index])
        weighted = weighted_key_attention(owner.attn, state.reducer.key_weights, name)
        if index in patched:
            owner.attn = weighted
        else:
            state.original_attentions[index] = owner.attn
            state.weighted_attentions[index] = weighted


def _install(model: nn.Module, patched: dict[int, nn.Module], state: EvitState) -> None:
    blocks = transformer_blocks(model)
    for index, block in patched.items():
        blocks[index] = block
    for index, attention in state.weighted_attentions.items():
        blocks[index].attn = attention
    setattr(model, STATE_ATTRIBUTE, state)
    state.forward_hook = model.register_forward_pre_hook(state.start_forward)


def remove_evit(model: ModelT) -> ModelT:
    """Put the original blocks back; the model then computes exactly as never patched."""
    state = evit_state(model)
    blocks = transformer_blocks(model)
    for index, block in state.original_blocks.items():
        blocks[index] = block
    for index, attention in state.original_attentions.items():
        attention.training = blocks[index].attn.training  # train()/eval() since patching reached the copy only
        blocks[index].attn = attention
    state.forward_hook.remove()
    delattr(model, STATE_ATTRIBUTE)
    return model


def set_keep_rate(model: nn.Module, keep_rate: float | Sequence[float]) -> None:
    """Change the keep rate of a patched model at run time (cheap: no re-patching)."""
    state = evit_state(model)
    state.keep_rates[:] = validated_keep_rates(keep_rate, len(state.layers))


def _probe_failure(model: nn.Module, state: EvitState | None) -> Exception | None:
    """Run one image through ``model`` with tokens actually dropped and return the error,
    if any: a model whose later layers cannot take a shorter sequence fails at patch
    time with a clear message, not in the middle of training."""
    shape = native_input_shape(model)
    parameter = next(model.parameters(), None)
    if shape is None or parameter is None or parameter.device.type == "meta":
        return None
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, *shape), generator=generator).to(parameter.device, parameter.dtype)
    rates = list(state.keep_rates) if state else []
    lengths: list[int] = []
    hooks = [block.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
             for block in transformer_blocks(model)[: state.layers[0] + 1]] if state else []
    if state:
        state.keep_rates[:] = [min(rate, 0.5) for rate in rates]
    try:
        with torch.no_grad(), eval_mode(model):
            model(image)
    except Exception as error:  # any failure of the model is reported to the caller
        return error
    finally:
        for hook in hooks:
            hook.remove()
        if state:
            state.keep_rates[:] = rates
            state.clear_record()
    return _prefix_mismatch(model, state.num_prefix_tokens, lengths) if state else None


def _prefix_mismatch(model: nn.Module, num_prefix_tokens: int, lengths: list[int]) -> UnsupportedModelError | None:
    """An error when the blocks up to the first reorganization see another number of tokens
    than the patches plus the prefix tokens: a class token that joins between blocks (or
    any other token timm does not count right) would be scored and fused as an image token."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(patches, int) or all(length == patches + num_prefix_tokens for length in lengths):
        return None
    return UnsupportedModelError(
        model_name(model), f"its blocks see {sorted(set(lengths))} tokens, not its {patches} patches plus "
        f"{num_prefix_tokens} prefix tokens (timm's num_prefix_tokens), so which tokens are class/register "
        "tokens cannot be told")
