"""An independent eager EViT forward for timm ViTs, for comparison with apply_evit.

It re-derives every transformer block with an explicit attention matrix and applies
the paper's reorganization sample by sample, with exact decimal arithmetic for the
kept count. Only the patch/position embedding and the head are taken from the model.
Everything is differentiable as written (the fused token's weights carry gradient, as
in the paper's code), so a training-mode forward and backward through it gives the
reference gradients too.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kept_count(num_tokens: int, keep_rate: float) -> int:
    return min(num_tokens, math.ceil(Fraction(str(keep_rate)) * num_tokens))


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _layer_scale(x: Tensor, scale: nn.Module) -> Tensor:
    return x * scale.gamma if hasattr(scale, "gamma") else x


def _attention(x: Tensor, attn: nn.Module) -> tuple[Tensor, Tensor]:
    batch, tokens, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    matrix = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    out = (matrix @ v).transpose(1, 2).reshape(batch, tokens, -1)
    return F.linear(out, attn.proj.weight, attn.proj.bias), matrix


def _mlp(x: Tensor, mlp: nn.Module) -> Tensor:
    return F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)


def reorganize_sample(x: Tensor, attention: Tensor, num_prefix: int, keep_rate: float, fuse: bool,
                      class_token: bool = True) -> Tensor:
    """One sample ``(N, C)`` with its attention ``(H, N, N)``: keep top-k, fuse the rest."""
    if class_token:
        scores = attention[:, 0, num_prefix:].mean(dim=0)
    else:
        scores = attention.mean(dim=(0, 1))[num_prefix:]
    image = x[num_prefix:]
    keep = kept_count(image.shape[0], keep_rate)
    if keep == image.shape[0]:
        return x
    ranking = scores.detach().tolist()  # the ranking only; the fused token below keeps the scores' gradient
    order = sorted(range(image.shape[0]), key=lambda i: -ranking[i])
    kept, unkept = order[:keep], order[keep:]
    parts = [x[:num_prefix], image[kept]]
    if fuse:
        fused = sum(scores[i] * image[i] for i in unkept)
        parts.append(fused.unsqueeze(0))
    return torch.cat(parts)


def reference_forward(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float,
                      fuse: bool) -> tuple[Tensor, list[int]]:
    """Logits of ``model`` with EViT applied at ``layers``, and the token count after each block."""
    num_prefix = model.num_prefix_tokens
    class_token = getattr(model, "cls_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    counts = []
    for index, block in enumerate(model.blocks):
        out, attention = _attention(_layer_norm(x, block.norm1), block.attn)
        x = x + _layer_scale(out, block.ls1)
        if index in layers:
            x = torch.stack([
                reorganize_sample(x[b], attention[b], num_prefix, keep_rate, fuse, class_token)
                for b in range(x.shape[0])
            ])
        x = x + _layer_scale(_mlp(_layer_norm(x, block.norm2), block.mlp), block.ls2)
        counts.append(x.shape[1])
    return model.forward_head(model.norm(x)), counts
