"""apply_dynamicvit / remove_dynamicvit: DynamicViT's learned token pruning on a timm ViT.

The original blocks stay in place (``state_dict`` keys unchanged): each stage block gets
a forward pre-hook that runs its predictor, every attention from the first stage on is
rewritten to weight its keys by the current keep decisions, and the predictors live in
one new submodule, ``model.dynamicvit_predictors``. Installing, the test forward, the
rollback and removal are the shared patch lifecycle's (:mod:`evit_patch.core.lifecycle`).
"""

from __future__ import annotations

import copy
import numbers
import warnings
from typing import Optional, Sequence, TypeVar

from torch import nn

from evit_patch.core.arguments import validated_layers
from evit_patch.core.block_rewrite import check_block_inputs
from evit_patch.core.key_weighting import KeyWeights, weighted_key_attention
from evit_patch.core.lifecycle import attach, attached_state, check_unpatched, detach, patch_state
from evit_patch.core.model_info import (
    class_token_joins_after_blocks,
    family_of,
    model_name,
    prefix_token_count,
    score_mode,
    transformer_blocks,
)
from evit_patch.core.positions import ATTENTION_BIAS, SequenceInput
from evit_patch.dynamicvit.predictor import KeepPredictor
from evit_patch.dynamicvit.state import DynamicViTState
from evit_patch.errors import UnsupportedModelError

ModelT = TypeVar("ModelT", bound=nn.Module)


def is_dynamicvit(model: nn.Module) -> bool:
    """Whether :func:`apply_dynamicvit` has patched ``model``."""
    return isinstance(attached_state(model), DynamicViTState)


def dynamicvit_state(model: nn.Module) -> DynamicViTState:
    """The shared state of a patched model; a clear error for an unpatched one."""
    return patch_state(model, DynamicViTState, "has no DynamicViT pruning; call apply_dynamicvit(model) first")


def predictors(model: nn.Module) -> nn.ModuleList:
    """The keep predictors of a patched model, one per stage."""
    return dynamicvit_state(model).predictors


def dynamicvit_extra_parameters(model: nn.Module) -> int:
    """Parameters DynamicViT adds to the model (its predictors)."""
    return sum(parameter.numel() for parameter in predictors(model).parameters())


def _validated_dynamicvit_keep_rate(keep_rate: float) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):
        raise TypeError(f"keep_rate must be a float in (0, 1], got {keep_rate!r}")
    if not 0.0 < float(keep_rate) <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1] (stage s keeps keep_rate**s of the image tokens), "
                         f"got {keep_rate!r}")
    return float(keep_rate)


def _check_class_token_head(model: nn.Module, name: str) -> None:
    """While training, dropped tokens stay in the sequence and are hidden from attention
    only; a head that pools all tokens would still read them."""
    if class_token_joins_after_blocks(model):
        raise UnsupportedModelError(
            name, "its class token joins only after `blocks` (a class-attention stage), which would read the "
            "tokens DynamicViT hides from attention while training")
    pool = getattr(model, "global_pool", None)
    if score_mode(model) != "class" or pool != "token" or getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            name, f"its head does not read the class token alone (global_pool={pool!r}); DynamicViT hides "
            "dropped tokens from attention only while training, so the head must be a class-token head "
            "(timm global_pool='token')")


def _required_module(owner: nn.Module, attribute: str, name: str, purpose: str) -> nn.Module:
    module = getattr(owner, attribute, None)
    if not isinstance(module, nn.Module):
        raise UnsupportedModelError(name, f"its {type(owner).__name__} has no `{attribute}` module ({purpose})")
    return module


def _embedding_width(model: nn.Module, name: str) -> int:
    width = getattr(model, "embed_dim", None)
    if not isinstance(width, int) or isinstance(width, bool):
        raise UnsupportedModelError(name, "it has no integer `embed_dim` telling the predictors the token width")
    return width


def _refuse_attention_bias(inputs: dict[str, Optional[SequenceInput]], name: str) -> None:
    """A bias each attention computes itself follows the tokens of the token reducers only:
    DynamicViT's pruned blocks get their block inputs' rows, not a bias inside their attention."""
    bias = inputs.get(ATTENTION_BIAS)
    if bias is not None:
        raise UnsupportedModelError(name, f"DynamicViT does not make its {bias.kind} follow the tokens it "
                                          "drops; use apply_evit or another token reducer on it")


def apply_dynamicvit(model: ModelT, layers: Sequence[int] = (3, 6, 9), keep_rate: float = 0.7, *,
                     keep_ratio: Optional[float] = None) -> ModelT:
    """Patch ``model`` in place with DynamicViT token pruning and return it.

    Args:
        model: a timm ViT with a class-token head (``blocks``, ``num_prefix_tokens``).
        layers: 0-indexed blocks before which a predictor decides (DeiT: 3, 6, 9).
        keep_rate: rho, per stage and compounding: stage s keeps ``int(N * rho**s)`` of the
            N original image tokens.
        keep_ratio: the former name of ``keep_rate`` (deprecated; warns).

    In ``train()`` mode tokens are masked out of attention (hard Gumbel-softmax
    decisions); in ``eval()`` mode they are removed, and a rotary table the blocks take
    (timm's ``Eva``) is given as the rows of the tokens kept. Class, distillation and register
    tokens are never pruned. On any error the model is left exactly as it was.
    """
    if keep_ratio is not None:
        warnings.warn("apply_dynamicvit(keep_ratio=...) is now keep_rate=..., the name every method uses; "
                      "keep_ratio goes in the next release", DeprecationWarning, stacklevel=2)
        keep_rate = keep_ratio
    check_unpatched(model)
    name = model_name(model)
    blocks = transformer_blocks(model)
    layers = validated_layers(layers, len(blocks))
    keep_rate = _validated_dynamicvit_keep_rate(keep_rate)
    num_prefix_tokens = prefix_token_count(model)
    _check_class_token_head(model, name)
    norm = _required_module(model, "norm", name, "the final norm whose tokens token distillation reads")
    width = _embedding_width(model, name)
    holder = KeyWeights(self_loop=True)
    inputs = family_of(model).sequence_inputs(model)
    positions = {input_name: follow for input_name, follow in inputs.items() if follow is not None}
    _refuse_attention_bias(inputs, name)
    for block in blocks:
        check_block_inputs(block, name, inputs)
    originals = {index: _required_module(blocks[index], "attn", name, "its attention")
                 for index in range(layers[0], len(blocks))}
    weighted = {index: weighted_key_attention(attention, holder, name, tuple(positions))
                for index, attention in originals.items()}
    parameter = next(model.parameters())
    stage_predictors = nn.ModuleList(KeepPredictor(width) for _ in layers).to(parameter.device, parameter.dtype)
    stage_predictors.train(model.training)
    state = DynamicViTState(layers, keep_rate, num_prefix_tokens, holder, originals, weighted, stage_predictors, norm,
                            positions)
    return attach(model, state)


def remove_dynamicvit(model: ModelT) -> ModelT:
    """Remove the predictors, hooks and attention rewrites: the model computes exactly as
    never patched (its own weights as they are now)."""
    dynamicvit_state(model)
    return detach(model)


def unpruned_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of a patched model without DynamicViT, in eval mode: the teacher
    DynamicViT distills from when none is given."""
    teacher = remove_dynamicvit(copy.deepcopy(model)).eval()
    return teacher.requires_grad_(False)
