"""An independent eager EViT forward for Hugging Face BEiT, whose layers hand their attention a
relative position bias over the full sequence (the model's shared one or each layer's own) as
``attention_mask``, for comparison with apply_token_reducer.

Sample by sample, every layer is the unpatched model's own modules (norms, the attention in its
eager implementation, LayerScale, MLP); each attention is given the rows and columns of its full
bias (built by the model's or the layer's own bias module for the image's patch grid) for the
tokens the sample still holds, picked by a plain list (:func:`reference_bias.bias_rows`): the
class token's first, then each image token's grid position; a fused token gets a zero row and
column. The attention matrix the scores come from is the eager attention's own weights.
"""

from __future__ import annotations

import copy

import torch
from reference_bias import bias_rows
from torch import Tensor, nn

from tests.reference_positions import Position, reorganize


def full_biases(base: nn.Module, images: Tensor) -> list[Tensor]:
    """Each layer's bias ``(1, H, 1 + N, 1 + N)`` for the patch grid of ``images``."""
    patch = base.config.patch_size
    window = (images.shape[2] // patch, images.shape[3] // patch)
    shared = base.shared_position_bias
    return [shared(window) if shared is not None else layer.relative_position_bias(window) for layer in base.layers]


def beit_reference(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float, fuse: bool,
                   ) -> tuple[Tensor, list[list[list[Position]]]]:
    """``last_hidden_state`` of the unpatched ``BeitModel`` with EViT at ``layers``, and each sample's
    grid positions after every reorganizing layer."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    biases = full_biases(model, images)
    tokens = model.embeddings(images)
    outputs, kept = [], []
    for sample in range(images.shape[0]):
        x, positions, history = tokens[sample:sample + 1], list(range(tokens.shape[1] - 1)), []
        for index, layer in enumerate(model.layers):
            bias = bias_rows(biases[index], 1, positions)
            out, weights = layer.attention(layer.layernorm_before(x), attention_mask=bias)
            x = x + layer.lambda_1 * out
            if index in layers:
                x, positions = reorganize(x, positions, weights[0], 1, keep_rate, fuse)
                history.append(positions)
            x = x + layer.lambda_2 * layer.mlp(layer.layernorm_after(x))
        outputs.append(model.layernorm(x))
        kept.append(history)
    return torch.cat(outputs), kept
