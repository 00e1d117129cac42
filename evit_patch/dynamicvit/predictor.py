"""DynamicViT's prediction module: for every image token, log-probabilities of keep / drop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evit_patch.core.scores import as_dtype, at_least_float32

KEEP = 0
"""Channel of the keep log-probability in the predictor's output (the other is drop)."""


class LogSoftmaxFloat32(nn.LogSoftmax):
    """Log-softmax in at least float32: under autocast CUDA computes it in float32 but the
    CPU in bf16, where many tokens would share a keep score and top-k would pick by rounding."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(as_dtype(input, at_least_float32(input.dtype)))


class KeepPredictor(nn.Module):
    """LayerNorm + Linear(C, C) + GELU, then half the channels stay per token (local) and
    half are averaged over the tokens still kept (global), so that a token is judged
    both by itself and by what the rest of the image holds; the concatenation goes
    through an MLP C -> C/2 -> C/4 -> 2 and a log-softmax."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.decide = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), LogSoftmaxFloat32(dim=-1),
        )
        self.local_channels = dim // 2

    def forward(self, tokens: Tensor, policy: Tensor) -> Tensor:
        """``(B, n, 2)`` log-probabilities for image tokens ``(B, n, C)`` of which
        ``policy`` ``(B, n)`` (0/1) marks the ones still kept."""
        features = self.embed(tokens)
        local, overall = features[..., : self.local_channels], features[..., self.local_channels:]
        weights = policy.unsqueeze(-1).to(features.dtype)
        mean = (overall * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.decide(torch.cat([local, mean.expand_as(overall)], dim=-1))
