"""Independent eager EViT forwards for Hugging Face transformers ViTs and open_clip's
VisionTransformer, for comparison with apply_evit.

Each block is re-derived with an explicit attention matrix from the module's weights;
the reorganization is reference_evit's (class-attention scores averaged over heads,
the ``ceil(keep_rate * n)`` highest kept highest first, the unkept tokens fused with
their raw scores), sample by sample. Only the embeddings, the MLP and LayerScale
modules (which no patch changes) and the final norm and head are taken from the model.
Everything is differentiable, so a backward through it gives reference gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference_evit import reorganize_sample
from torch import Tensor, nn


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, H, N, d)`` queries, keys and values: the output ``(B, N, H * d)`` and the matrix."""
    matrix = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    out = (matrix @ v).transpose(1, 2).flatten(2)
    return out, matrix


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _reorganize(x: Tensor, matrix: Tensor, num_prefix: int, keep_rate: float, fuse: bool) -> Tensor:
    return torch.stack([reorganize_sample(x[b], matrix[b], num_prefix, keep_rate, fuse) for b in range(x.shape[0])])


def transformers_reference(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float, fuse: bool,
                           num_prefix: int, states: list[Tensor] | None = None) -> tuple[Tensor, list[int]]:
    """The final hidden states (before the model's last norm) of a transformers ViT, DeiT
    or DINOv2 with EViT at ``layers``, and the token count after each layer; ``states``, when
    given, receives the embeddings' output and every layer's."""
    base = model.base_model
    heads = base.config.num_attention_heads
    x = base.embeddings(images)
    blocks = base.layers if hasattr(base, "layers") else base.encoder.layer
    counts = []
    if states is not None:
        states.append(x)
    for index, layer in enumerate(blocks):
        if hasattr(layer, "layernorm_before"):  # ViT, DeiT
            norm1, norm2, scale1, scale2 = layer.layernorm_before, layer.layernorm_after, None, None
        else:  # DINOv2: LayerScale on both branches
            norm1, norm2, scale1, scale2 = layer.norm1, layer.norm2, layer.layer_scale1, layer.layer_scale2
        attention = layer.attention
        h = norm1(x)
        q, k, v = (_split_heads(F.linear(h, p.weight, p.bias), heads)
                   for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        out, matrix = _explicit_attention(q, k, v)
        out = F.linear(out, attention.o_proj.weight, attention.o_proj.bias)
        x = x + (out * scale1.lambda1 if scale1 is not None else out)
        if index in layers:
            x = _reorganize(x, matrix, num_prefix, keep_rate, fuse)
        out = layer.mlp(norm2(x))
        x = x + (out * scale2.lambda1 if scale2 is not None else out)
        counts.append(x.shape[1])
        if states is not None:
            states.append(x)
    return x, counts


def open_clip_reference(visual: nn.Module, images: Tensor, layers: list[int], keep_rate: float,
                        fuse: bool) -> tuple[Tensor, list[int]]:
    """The image embedding of an open_clip VisionTransformer (default blocks) with EViT at
    ``layers``, and the token count after each block."""
    x = visual._embeds(images)
    counts = []
    for index, block in enumerate(visual.transformer.resblocks):
        mha = block.attn
        h = block.ln_1(x)
        q, k, v = (_split_heads(part, mha.num_heads)
                   for part in F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
        out, matrix = _explicit_attention(q, k, v)
        x = x + block.ls_1(F.linear(out, mha.out_proj.weight, mha.out_proj.bias))
        if index in layers:
            x = _reorganize(x, matrix, 1, keep_rate, fuse)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        counts.append(x.shape[1])
    pooled, _ = visual._pool(x)
    return (pooled @ visual.proj if visual.proj is not None else pooled), counts
