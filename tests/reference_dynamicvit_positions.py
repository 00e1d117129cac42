"""An independent eager DynamicViT inference for timm's rotary ``Eva`` models, for comparison
with apply_dynamicvit.

Sample by sample: before each stage block the predictor's keep scores are computed from its
weights with plain torch functions (LayerNorm, Linear, GELU; half the channels per token, half
averaged over the tokens the sample holds; the MLP and a log-softmax), the top
``int(N rho^(s+1))`` image tokens are kept, and every block is the unpatched model's own,
called with the rotary rows of the image tokens the sample holds, picked from the model's full
table by a plain list of grid positions. Prefix tokens are never in the table.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.reference_positions import rotary_rows


def keep_scores(predictor: nn.Module, tokens: Tensor) -> list[float]:
    """The keep log-probability of each image token ``(n, C)`` of one sample, all of them kept before."""
    norm, linear, _ = predictor.embed
    features = F.gelu(F.linear(F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                               linear.weight, linear.bias))
    half = features.shape[-1] // 2
    mixed = torch.cat([features[:, :half], features[:, half:].mean(0, keepdim=True).expand(len(tokens), -1)], -1)
    first, _, second, _, third, _ = predictor.decide
    hidden = F.gelu(F.linear(F.gelu(F.linear(mixed, first.weight, first.bias)), second.weight, second.bias))
    return F.linear(hidden, third.weight, third.bias).float().log_softmax(-1)[:, 0].tolist()


def dynamicvit_reference(model: nn.Module, predictors: nn.ModuleList, images: Tensor, layers: list[int],
                         keep_rate: float) -> tuple[Tensor, list[list[list[int]]]]:
    """The final norm's tokens of the unpatched ``model`` (an ``Eva``) pruned by ``predictors``
    before ``layers``, and each sample's grid positions after every stage."""
    model = copy.deepcopy(model)
    num_prefix = model.num_prefix_tokens
    tokens, table = model._pos_embed(model.patch_embed(images))
    tokens = model.norm_pre(tokens)
    count = tokens.shape[1] - num_prefix
    outputs, kept = [], []
    for sample in range(images.shape[0]):
        x, positions, history = tokens[sample:sample + 1], list(range(count)), []
        for index, block in enumerate(model.blocks):
            if index in layers:
                stage = layers.index(index)
                scores = keep_scores(predictors[stage], x[0, num_prefix:])
                order = sorted(range(len(scores)), key=lambda i: -scores[i])[:max(1, int(count * keep_rate ** (stage + 1)))]
                x = torch.cat([x[:, :num_prefix], x[:, num_prefix:][:, order]], 1)
                positions = [positions[j] for j in order]
                history.append(positions)
            x = block(x, rope=rotary_rows(table[index] if model.rope_mixed else table, positions))
        outputs.append(model.norm(x))
        kept.append(history)
    return torch.cat(outputs), kept
