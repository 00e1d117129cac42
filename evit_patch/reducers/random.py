"""Random drop: the control that tells whether *which* tokens EViT keeps matters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from evit_patch.core.per_call import PerCall
from evit_patch.core.reduction import LayerContext, Reduction, TokenReducer, identity_reduction, selection_reduction
from evit_patch.core.scores import AttentionTensors
from evit_patch.reducers.counting import kept_token_count
from evit_patch.reducers.registry import TokenMethod, register_token_method

_LOW_32_BITS = 0xFFFFFFFF


def _multiply_32(values: Tensor, constant: int) -> Tensor:
    """``values * constant mod 2**32`` for values below 2**32, in two 16-bit halves so no
    int64 product overflows."""
    high = (((values >> 16) * constant) & 0xFFFF) << 16
    return ((values & 0xFFFF) * constant + high) & _LOW_32_BITS


def _hash_32(values: Tensor) -> Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' ``lowbias32``) of values below 2**32."""
    values = values ^ (values >> 16)
    values = _multiply_32(values, 0x7FEB352D)
    values = values ^ (values >> 15)
    values = _multiply_32(values, 0x846CA68B)
    return values ^ (values >> 16)


_PIXELS_HASHED = 4096


def image_keys(images: Tensor, seed: int) -> Tensor:
    """``(B,)`` one key per sample: a hash of ``seed`` and the sample's pixels (their float32
    bits, each hashed with its place), so the same image draws the same tokens whoever
    calls, in whatever order. At most :data:`_PIXELS_HASHED` pixels evenly spread over the
    image are read: hashing every pixel costs a visible part of an eager forward
    (docs/measured.md)."""
    flat = images.detach().flatten(1)
    flat = flat[:, :: max(1, flat.shape[1] // _PIXELS_HASHED)]
    pixels = flat.to(torch.float32).view(torch.int32).to(torch.int64) & _LOW_32_BITS
    places = _hash_32(torch.arange(pixels.shape[1], device=images.device) ^ (seed & _LOW_32_BITS))
    return _hash_32(_hash_32(pixels ^ places).sum(dim=1) & _LOW_32_BITS)


def random_kept_index(keys: Tensor, num_tokens: int, keep: int, layer: int) -> Tensor:
    """``(B, keep)`` distinct token indices per sample, uniformly at random given the
    sample ``keys`` ``(B,)`` and the ``layer``: pure tensor code, with no generator state
    (so concurrent and compiled calls draw as one call after another would)."""
    tokens = torch.arange(num_tokens, device=keys.device)
    layer_keys = _hash_32(keys ^ _hash_32(torch.tensor(layer, device=keys.device)))
    draws = _hash_32((layer_keys[:, None] + tokens) & _LOW_32_BITS)
    return draws.argsort(dim=1)[:, :keep]


class RandomDrop(TokenReducer):
    """Keep ``ceil(keep_rate * n)`` image tokens chosen uniformly at random, drop the rest.

    The same counts as EViT without fusion, with no look at the tokens' content. The draw
    is a function of ``seed``, the image and the layer (:func:`image_keys`), and in
    training of a count of training draws too: a run is reproducible whatever else uses
    the global random state, each training step draws afresh, and in evaluation a served
    model gives one image the same answer in any thread and in any order of calls.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.name = f"random(seed={seed})"
        self.call = PerCall()  # the keys of the images of the forward running in each thread
        self.training_draws = torch.zeros((), dtype=torch.int64)  # a tensor: compiled code reads it, never guards it

    def start_forward(self, images: Tensor, training: bool) -> None:
        self.call.set("keys", image_keys(images, self.seed))

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        num_image = x.shape[1] - context.num_prefix_tokens
        keep = kept_token_count(num_image, context.keep_rate)
        if keep >= num_image:
            return identity_reduction(x, context.num_prefix_tokens)
        keys: Optional[Tensor] = self.call.get("keys")
        if keys is None or keys.shape[0] != x.shape[0]:  # a block run without the model's input module
            keys = image_keys(x, self.seed)
        keys = keys.to(x.device)
        if context.training:  # a new draw for every training step, even of the same images
            self.training_draws.add_(1)
            keys = _hash_32(keys ^ _hash_32(self.training_draws.to(x.device)))
        kept_index = random_kept_index(keys, num_image, keep, context.position)
        return selection_reduction(x, context.num_prefix_tokens, kept_index, None)


@dataclass(frozen=True)
class RandomOptions:
    """``seed``: the draw's seed (a field's metadata: the range a recipe checks, and it in words)."""

    seed: int = field(default=0, metadata={"ge": 0, "lt": 2**63, "must": "an integer in [0, 2**63)"})


register_token_method(TokenMethod("random", "random drop", RandomDrop, RandomOptions))
