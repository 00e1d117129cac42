"""An independent eager EViT forward for timm ViTs, for comparison with apply_evit.

It re-derives every transformer block with an explicit attention matrix and applies
the paper's reorganization sample by sample; the kept count is the official code's
``math.ceil(keep_rate * n)`` of the float product. Only the patch/position embedding
and the head are taken from the model (:func:`reference_forward_zoo` also calls the
blocks' own norm, MLP and LayerScale modules, which no patch changes).
Everything is differentiable as written (the fused token's weights carry gradient, as
in the paper's code), so a training-mode forward and backward through it gives the
reference gradients too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kept_count(num_tokens: int, keep_rate: float) -> int:
    """The official EViT count: the ceiling of the float product, no rounding."""
    return min(num_tokens, math.ceil(keep_rate * num_tokens))


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


def scores_and_order(attention: Tensor, num_prefix: int, class_token: bool) -> tuple[Tensor, list[int]]:
    """One sample's image-token scores from its attention ``(H, N, N)`` (the class token's
    row, or the attention each token receives averaged over all queries), and the image
    tokens in descending score order."""
    if class_token:
        scores = attention[:, 0, num_prefix:].mean(dim=0)
    else:
        scores = attention.mean(dim=(0, 1))[num_prefix:]
    ranking = scores.detach().tolist()  # the ranking only; the fused token keeps the scores' gradient
    return scores, sorted(range(scores.shape[0]), key=lambda i: -ranking[i])


def reorganize_sample(x: Tensor, attention: Tensor, num_prefix: int, keep_rate: float, fuse: bool,
                      class_token: bool = True) -> Tensor:
    """One sample ``(N, C)`` with its attention ``(H, N, N)``: keep top-k, fuse the rest."""
    scores, order = scores_and_order(attention, num_prefix, class_token)
    image = x[num_prefix:]
    keep = kept_count(image.shape[0], keep_rate)
    if keep == image.shape[0]:
        return x
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


def _mix_heads(weights: Tensor, linear: nn.Linear) -> Tensor:
    """Talking-heads attention: a linear map across the heads of ``(B, H, Nq, Nk)``."""
    return torch.einsum("bhqk,gh->bgqk", weights, linear.weight) + linear.bias[:, None, None]


def _any_attention(x: Tensor, attn: nn.Module) -> tuple[Tensor, Tensor]:
    """timm's ``Attention`` (q/k norm, scale norm, gate) or CaiT's talking heads, with the
    attention matrix the values are multiplied by."""
    batch, tokens, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if hasattr(attn, "proj_w"):
        matrix = _mix_heads(_mix_heads(logits, attn.proj_l).softmax(dim=-1), attn.proj_w)
    else:
        matrix = logits.softmax(dim=-1)
    out = (matrix @ v).transpose(1, 2).reshape(batch, tokens, -1)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return F.linear(out, attn.proj.weight, attn.proj.bias), matrix


def _branch_scale(block: nn.Module, branch: int, x: Tensor) -> Tensor:
    """LayerScale of a residual branch: timm's ``ls1``/``ls2`` or CaiT's ``gamma_1``/``gamma_2``."""
    scale = getattr(block, f"ls{branch}", None)
    return scale(x) if scale is not None else getattr(block, f"gamma_{branch}") * x


def _embed(model: nn.Module, images: Tensor) -> Tensor:
    if hasattr(model, "blocks_token_only"):  # CaiT: patches and positions; the class token joins later
        return model.patch_embed(images) + model.pos_embed
    if hasattr(model, "embeds"):  # NaFlexVit
        return model._forward_embeds(images, None, None, None)["patches"]
    return model.norm_pre(model._pos_embed(model.patch_embed(images)))


def _head(model: nn.Module, x: Tensor) -> Tensor:
    if hasattr(model, "blocks_token_only"):  # CaiT's class-attention stage reads the blocks' tokens
        class_token = model.cls_token.expand(x.shape[0], -1, -1)
        for block in model.blocks_token_only:
            class_token = block(x, class_token)
        x = torch.cat([class_token, x], dim=1)
    return model.forward_head(model.norm(x))


def reference_forward_zoo(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float, fuse: bool,
                          num_prefix: int, class_token: bool) -> tuple[Tensor, list[int], dict[int, Tensor],
                                                                       dict[int, list[list[int]]]]:
    """EViT on any timm ViT of the pre-norm (``Block``, CaiT's ``LayerScaleBlock``) or
    post-norm (``ResPostBlock``) kind, with ``num_prefix`` prefix tokens in the blocks and
    class-token or mean-received-attention scores as ``class_token`` says.

    Returns the logits, the token count after each block, the tokens right after each
    reorganization (before the MLP) and, per reorganization layer and sample, the kept
    image tokens highest score first.
    """
    x = _embed(model, images)
    counts, reorganized, kept = [], {}, {}
    for index, block in enumerate(model.blocks):
        post_norm = type(block).__name__ == "ResPostBlock"
        if post_norm:
            out, attention = _any_attention(x, block.attn)
            x = x + block.norm1(out)
        else:
            out, attention = _any_attention(block.norm1(x), block.attn)
            x = x + _branch_scale(block, 1, out)
        if index in layers:
            x = torch.stack([
                reorganize_sample(x[b], attention[b], num_prefix, keep_rate, fuse, class_token)
                for b in range(x.shape[0])
            ])
            reorganized[index] = x
            orders = [scores_and_order(attention[b], num_prefix, class_token)[1] for b in range(x.shape[0])]
            kept[index] = [order[:kept_count(len(order), keep_rate)] for order in orders]
        if post_norm:
            x = x + block.norm2(block.mlp(x))
        else:
            x = x + _branch_scale(block, 2, block.mlp(block.norm2(x)))
        counts.append(x.shape[1])
    return _head(model, x), counts, reorganized, kept
