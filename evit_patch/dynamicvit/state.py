"""Runtime state of one DynamicViT-patched model: its settings and what a forward leaves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from evit_patch.key_weighting import KeyWeights


@dataclass(eq=False)
class ForwardRecord:
    """What the last forward left for the loss and for inspection.

    Training: ``policies`` holds each stage's 0/1 keep decisions ``(B, N)`` over the
    original image tokens (a stage's decisions times the previous stage's, so a dropped
    token never comes back) and ``final_tokens`` the output of the final norm.
    Inference: ``kept_indices`` holds each stage's kept tokens ``(B, k)`` as indices of
    the ``num_image_tokens`` original image tokens, highest keep score first.
    """

    policies: list[Tensor] = field(default_factory=list)
    kept_indices: list[Tensor] = field(default_factory=list)
    num_image_tokens: Optional[int] = None
    final_tokens: Optional[Tensor] = None

    def __deepcopy__(self, memo: dict) -> "ForwardRecord":
        """An empty record: these tensors belong to one forward of the original model
        (and tensors inside an autograd graph cannot be deep-copied)."""
        return ForwardRecord()


@dataclass(eq=False)
class DynamicViTState:
    """Settings and per-forward record shared by the stage hooks of one model (not
    globals, so a model and its EMA copy never see each other's decisions)."""

    layers: list[int]
    keep_ratio: float
    num_prefix_tokens: int
    key_weights: KeyWeights
    original_attentions: dict[int, nn.Module]
    handles: list[RemovableHandle] = field(default_factory=list)
    record: ForwardRecord = field(default_factory=ForwardRecord)

    def keep_fractions(self) -> list[float]:
        """Fraction of the original image tokens each stage keeps: rho, rho^2, rho^3, ..."""
        return [self.keep_ratio ** (stage + 1) for stage in range(len(self.layers))]

    def kept_count(self, num_image_tokens: int, stage: int) -> int:
        """``int(N * rho^(stage+1))`` (at least 1); the product is rounded to 6 decimals
        first so that float noise such as ``0.7**2 * 100 = 48.99999999999999`` does not
        keep one token fewer than the formula."""
        return max(1, int(round(num_image_tokens * self.keep_fractions()[stage], 6)))
