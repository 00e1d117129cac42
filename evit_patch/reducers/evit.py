"""EViT token reorganization: keep the most attended tokens, fuse the rest into one."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence, TypeVar, get_args

from torch import Tensor, nn

from evit_patch.core.reduction import LayerContext, Reduction, TokenReducer, identity_reduction, selection_reduction
from evit_patch.core.scores import AttentionTensors
from evit_patch.core.token_patch import apply_token_reducer
from evit_patch.reducers.counting import kept_token_count
from evit_patch.reducers.registry import TokenMethod, register_token_method, selected_method

ModelT = TypeVar("ModelT", bound=nn.Module)

Variant = Literal["paper", "training-free"]
"""``paper``: the official method, to be fine-tuned. ``training-free``: the same layers,
token counts and MACs for a model used as it is (:mod:`evit_patch.reducers.training_free`)."""
VARIANTS: tuple[str, ...] = get_args(Variant)


def evit_reduction(x: Tensor, scores: Tensor, num_prefix_tokens: int, keep_rate: float,
                   fuse: bool = True, top_member: bool = False) -> Reduction:
    """Keep the top-scored image tokens and (optionally) fuse the others into one token.

    Args:
        x: tokens ``(B, P + n, C)``; the first ``P = num_prefix_tokens`` are never touched.
        scores: attentiveness of each image token ``(B, n)`` (class attention averaged
            over heads). The fused token is the sum of the unkept tokens weighted by
            these raw scores, as in the paper (no renormalization).
        keep_rate: fraction in (0, 1]; ``ceil(keep_rate * n)`` tokens are kept.
        fuse: append the fused token (EViT) or drop the unkept tokens (EViT w/o fusion).
        top_member: record the fused token's most attended member in the map (the
            position rule ``top-member``); the tokens are the same either way.

    The result is ``[prefix, kept (highest score first), fused]``; when every token is
    kept, ``x`` itself with the identity index.
    """
    num_image = x.shape[1] - num_prefix_tokens
    keep = kept_token_count(num_image, keep_rate)
    if keep >= num_image:
        return identity_reduction(x, num_prefix_tokens)
    kept_index = scores.topk(keep, dim=1).indices
    fused_weights = scores.scatter(1, kept_index, 0.0) if fuse else None
    member = top_dropped(scores, kept_index) if fuse and top_member else None
    return selection_reduction(x, num_prefix_tokens, kept_index, fused_weights, member)


def top_dropped(scores: Tensor, kept_index: Tensor) -> Tensor:
    """``(B, 1)``: the highest-scored token not in ``kept_index``, the heaviest member of the
    fused token. The kept ones are masked out rather than taken from a ``topk(keep + 1)``, so
    the kept tokens stay the paper's ``topk(keep)`` whatever the ties."""
    return scores.detach().scatter(1, kept_index, float("-inf")).argmax(1, keepdim=True)


def reorganize_tokens(x: Tensor, scores: Tensor, num_prefix_tokens: int, keep_rate: float,
                      fuse: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`evit_reduction` as ``(tokens, kept_index)``."""
    reduction = evit_reduction(x, scores, num_prefix_tokens, keep_rate, fuse)
    return reduction.tokens, reduction.kept_index


class EvitReducer(TokenReducer):
    """The paper's method (``fuse=True``) or "EViT w/o fusion" (``fuse=False``).

    Scores are computed only when the layer really drops tokens, so a layer at keep
    rate 1.0 costs nothing.
    """

    def __init__(self, fuse: bool = True) -> None:
        self.fuse = fuse
        self.name = "evit" if fuse else "evit-no-fusion"

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        num_image = x.shape[1] - context.num_prefix_tokens
        if kept_token_count(num_image, context.keep_rate) >= num_image:
            return identity_reduction(x, context.num_prefix_tokens)
        return evit_reduction(x, context.scores(attention), context.num_prefix_tokens, context.keep_rate, self.fuse,
                              context.top_member)


def apply_evit(model: ModelT, layers: Sequence[int] | None = None, keep_rate: float | Sequence[float] = 0.7, *,
               fuse: bool = True, variant: Variant = "paper") -> ModelT:
    """Patch ``model`` in place with EViT token reorganization and return it.

    Args:
        model: a timm ViT (``blocks``, ``num_prefix_tokens``), a transformers ViT / DeiT /
            DINOv2, or an open_clip image tower.
        layers: 0-indexed blocks that reorganize tokens. None: the paper's placement
            scaled to the depth, ``depth * i // 4`` for i = 1, 2, 3 (DeiT's 12 blocks ->
            3, 6, 9; 16 -> 4, 8, 12; 24 -> 6, 12, 18; 6 -> 1, 3, 4).
        keep_rate: fraction in (0, 1] of image tokens each layer keeps; one float, or
            one per layer (the paper's main setting: 0.7). Change it later with
            :func:`evit_patch.set_keep_rate` or ``model.keep_rate = 0.5``.
        fuse: fuse the unkept tokens into one (EViT) or drop them ("EViT w/o fusion").
        variant: ``"paper"`` (the official method, bitwise) or ``"training-free"`` (the
            same token counts, for a model that is not fine-tuned afterwards:
            :class:`~evit_patch.reducers.training_free.TrainingFreeEvit`; it always merges,
            so ``fuse`` must stay True).

    No parameter or buffer is added: ``state_dict()`` is unchanged. On any error the
    model is left exactly as it was.
    """
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True or False, got {fuse!r}")
    if variant not in VARIANTS:
        close = difflib.get_close_matches(str(variant), VARIANTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}{hint}")
    try:
        EvitOptions(fuse, variant)
    except ValueError as error:
        raise ValueError(f"variant {error}: drop fuse=False, or use variant='paper'") from None
    options = {"fuse": fuse, "variant": variant}  # the registry's forms of evit: no fusion, training-free
    return apply_token_reducer(model, layers, keep_rate, selected_method("evit", options).build(options))


@dataclass(frozen=True)
class EvitOptions:
    """``fuse``: fuse the unkept tokens into one (false: EViT w/o fusion). ``variant``: the
    paper's method, or the training-free one (:mod:`evit_patch.reducers.training_free`)."""

    fuse: bool = True
    variant: Variant = "paper"

    def __post_init__(self) -> None:
        if self.variant == "training-free" and not self.fuse:
            raise ValueError(f"{self.variant!r} merges every unkept token into a kept one and has no no-fusion form")


def paper_evit(fuse: bool = True, variant: Variant = "paper") -> EvitReducer:
    """The ``evit`` method's reducer; its ``variant`` is always ``paper`` here, since the
    training-free one is a method of its own (selected by ``variant``, never built here)."""
    if variant != "paper":
        raise ValueError(f"variant {variant!r} is the method 'evit-training-free', not a form of EvitReducer")
    return EvitReducer(fuse)


register_token_method(TokenMethod("evit", "EViT", paper_evit, EvitOptions))
register_token_method(TokenMethod("evit-no-fusion", "EViT w/o fusion", partial(EvitReducer, fuse=False),
                                  form_of=("evit", {"fuse": False})))
