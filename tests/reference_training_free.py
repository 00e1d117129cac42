"""An independent eager forward of training-free EViT for timm ViTs, for comparison with
``apply_evit(..., variant="training-free")``.

Written from the method's description (``docs/findings.md``), sample by sample with
Python loops and explicit matrices, sharing no code with the product: at each
reorganization layer of ``n`` image tokens, ``keep = ceil(r n) + 1`` tokens stay.

- Scores: the class token's softmax over the keys (the plain logits ``q k / sqrt(d)``),
  its own column left out, averaged over heads.
- Absorb: the ``keep`` highest-scored tokens stay (in their sequence order); every other
  token is added to the kept token with the highest cosine similarity of the tokens
  themselves, as a size-weighted average.
- Pool: ToMe's bipartite merge with the tokens themselves as the metric
  (``reference_tome.merge_sample``, itself written from the ToMe paper), possible where at
  most ``ceil(n / 2)`` tokens are merged.
- ``pooling``: ``never`` absorbs, ``always`` pools where it can, ``closer`` pools where it
  can and the cosines of the pooled tokens with the tokens they go into add up to more
  than those of the absorbed tokens with theirs.
- Sizes go on from layer to layer; with ``proportional`` every attention from the first
  reorganization layer on adds ``log size`` of each key to its logits.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from reference_tome import SampleMerge, merge_sample
from torch import Tensor, nn


def kept_count(num_tokens: int, keep_rate: float) -> int:
    """EViT's kept tokens plus its fused one, at most all of them."""
    return min(num_tokens, math.ceil(keep_rate * num_tokens) + 1)


def _attention(h: Tensor, attn: nn.Module, key_weights: Optional[list[float]]) -> tuple[Tensor, Tensor]:
    """One sample's attention output ``(N, C)`` and the class row's plain softmax per head ``(H, N)``."""
    tokens, channels = h.shape
    heads = attn.num_heads
    qkv = h @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv.reshape(tokens, 3, heads, channels // heads).permute(1, 2, 0, 3)
    outputs, class_rows = [], []
    for head in range(heads):
        logits = q[head] @ k[head].T / math.sqrt(q.shape[-1])
        plain = (logits[0] - logits[0].max()).exp()
        class_rows.append(plain / plain.sum())
        if key_weights is not None:
            logits = logits + torch.tensor([math.log(w) for w in key_weights])[None, :]
        exponentials = (logits - logits.max(dim=1, keepdim=True).values).exp()
        outputs.append(exponentials / exponentials.sum(dim=1, keepdim=True) @ v[head])
    return torch.cat(outputs, dim=1) @ attn.proj.weight.T + attn.proj.bias, torch.stack(class_rows)


def cosine(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def absorb_sample(tokens: Tensor, scores: list[float], sizes: list[float], keep: int
                  ) -> tuple[Tensor, list[float], list[int], list[int], list[float]]:
    """One sample: kept tokens absorb the others. Returns the output tokens, their sizes,
    the kept token indices (in sequence order), each incoming token's destination and the
    cosine of each absorbed token (in descending score order) with the kept token it joins."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept, rest = sorted(order[:keep]), order[keep:]
    sums = [sizes[i] * tokens[i] for i in kept]
    out_sizes = [sizes[i] for i in kept]
    destination, similarities = [0] * len(scores), []
    for slot, i in enumerate(kept):
        destination[i] = slot
    for j in rest:
        cosines = [cosine(tokens[j], tokens[i]) for i in kept]
        slot = max(range(keep), key=lambda t: cosines[t])
        sums[slot] = sums[slot] + sizes[j] * tokens[j]
        out_sizes[slot] += sizes[j]
        destination[j] = slot
        similarities.append(cosines[slot])
    return torch.stack([s / z for s, z in zip(sums, out_sizes)]), out_sizes, kept, destination, similarities


def pooled_similarities(tokens: Tensor, record: SampleMerge) -> list[float]:
    """The cosine of each token a bipartite merge sent into another with that token."""
    return [cosine(tokens[i], tokens[record.kept_index[slot]])
            for i, slot in enumerate(record.destination) if record.kept_index[slot] != i]


@torch.no_grad()
def training_free_forward(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float,
                          pooling: str = "always", proportional: bool = True,
                          maps: Optional[list[list[tuple[list[int], list[int]]]]] = None
                          ) -> tuple[Tensor, list[list[list[float]]]]:
    """Logits, and per reorganization layer each sample's token sizes after it. ``maps``,
    when given, gets per layer each sample's kept indices and destinations."""
    prefix = model.num_prefix_tokens
    embedded = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    logits, sizes_per_layer = [], [[] for _ in layers]
    for sample in range(images.shape[0]):
        x = embedded[sample]
        sizes: Optional[list[float]] = None
        for index, block in enumerate(model.blocks):
            key_weights = [1.0] * prefix + sizes if (proportional and sizes is not None) else None
            out, class_rows = _attention(F.layer_norm(x, block.norm1.normalized_shape, block.norm1.weight,
                                                      block.norm1.bias, block.norm1.eps), block.attn, key_weights)
            x = x + out
            if index in layers:
                count = x.shape[0] - prefix
                keep = kept_count(count, keep_rate)
                if keep < count:
                    scores = (sum(class_rows[h] for h in range(class_rows.shape[0])) / class_rows.shape[0])[prefix:].tolist()
                    current = sizes or [1.0] * count
                    image = x[prefix:]
                    merged, new_sizes, kept, destination, absorbed = absorb_sample(image, scores, current, keep)
                    if pooling != "never" and count - keep <= (count + 1) // 2:
                        pooled, record = merge_sample(image, image, current, count - keep)
                        if pooling == "always" or sum(pooled_similarities(image, record)) > sum(absorbed):
                            merged, new_sizes = pooled, record.sizes
                            kept, destination = record.kept_index, record.destination
                    sizes = new_sizes
                    if maps is not None:
                        while len(maps) <= layers.index(index):
                            maps.append([])
                        maps[layers.index(index)].append((list(kept), list(destination)))
                    x = torch.cat([x[:prefix], merged])
                sizes_per_layer[layers.index(index)].append(list(sizes or [1.0] * count))
            x = x + block.mlp(F.layer_norm(x, block.norm2.normalized_shape, block.norm2.weight, block.norm2.bias,
                                           block.norm2.eps))
        logits.append(model.forward_head(model.norm(x.unsqueeze(0)))[0])
    return torch.stack(logits), sizes_per_layer
