"""What happens before each stage block: a keep decision for every image token.

Training keeps the sequence whole: the decisions become the key weights of every
attention from the first stage on, so dropped tokens stop being attended to while the
predictors still get gradients. Inference really drops tokens: the top ``int(N rho^s)``
image tokens by keep score are gathered and later blocks run on the shorter sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evit_patch.core.key_weighting import KeyWeights
from evit_patch.core.reduction import prefix_and_kept
from evit_patch.dynamicvit.predictor import KEEP, KeepPredictor


@dataclass(eq=False)
class ForwardRecord:
    """What the last forward left for the loss and for inspection.

    Training: ``policies`` holds each stage's 0/1 keep decisions ``(B, N)`` over the
    original image tokens (a stage's decisions times the previous stage's, so a dropped
    token never comes back) and ``final_tokens`` the output of the final norm.
    Inference: ``kept_indices`` holds each stage's kept tokens ``(B, k)`` as indices of
    the ``num_image_tokens`` original image tokens, highest keep score first, and
    ``followed`` the rows of a rotary table gathered for them (by stage count and input name).
    """

    policies: list[Tensor] = field(default_factory=list)
    kept_indices: list[Tensor] = field(default_factory=list)
    num_image_tokens: Optional[int] = None
    final_tokens: Optional[Tensor] = None
    followed: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> "ForwardRecord":
        """An empty record: these tensors belong to one forward of the original model
        (and tensors inside an autograd graph cannot be deep-copied)."""
        return ForwardRecord()


class StageSettings(Protocol):
    """What the stage hooks read and write of the model's DynamicViT state
    (:class:`~evit_patch.dynamicvit.state.DynamicViTState`, which installs them)."""

    num_prefix_tokens: int
    key_weights: KeyWeights
    record: ForwardRecord

    def kept_count(self, num_image_tokens: int, stage: int) -> int: ...


def gumbel_keep_decisions(log_probabilities: Tensor) -> Tensor:
    """Hard 0/1 keep decisions ``(B, n)`` sampled with Gumbel-softmax; the gradient is the
    soft sample's (straight-through)."""
    return F.gumbel_softmax(log_probabilities, hard=True)[..., KEEP]


class StagePruner:
    """Forward pre-hook of one stage block (the block's own module and ``state_dict``
    stay as they are)."""

    def __init__(self, state: StageSettings, predictor: KeepPredictor, stage: int) -> None:
        self.state = state
        self.predictor = predictor
        self.stage = stage

    def __call__(self, block: nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        tokens = args[0]
        if self.stage == 0:  # int(): a tensor while torch.jit traces (fvcore)
            self.state.record = ForwardRecord(num_image_tokens=int(tokens.shape[1]) - self.state.num_prefix_tokens)
        if block.training:
            self._mask(tokens)
            return None
        return (self._prune(tokens), *args[1:])

    def _mask(self, x: Tensor) -> None:
        state, record = self.state, self.state.record
        prefix = x[:, : state.num_prefix_tokens]
        image = x[:, state.num_prefix_tokens:]
        previous = record.policies[-1] if self.stage else image.new_ones(image.shape[:2])
        policy = gumbel_keep_decisions(self.predictor(image, previous)) * previous
        record.policies.append(policy)
        state.key_weights.weights = torch.cat([policy.new_ones(prefix.shape[:2]), policy], dim=1)

    def _prune(self, x: Tensor) -> Tensor:
        state, record = self.state, self.state.record
        state.key_weights.weights = None
        image = x[:, state.num_prefix_tokens:]
        batch, count, _ = image.shape
        if self.stage == 0:
            original = torch.arange(count, device=x.device).expand(batch, -1)
        else:
            original = record.kept_indices[-1]
        scores = self.predictor(image, image.new_ones(batch, count))[..., KEEP]
        keep = min(int(count), state.kept_count(record.num_image_tokens, self.stage))
        order = scores.topk(keep, dim=1).indices
        record.kept_indices.append(original.gather(1, order))
        return prefix_and_kept(x, state.num_prefix_tokens, order)


class FinalTokens:
    """Forward hook of the final norm: keeps its output of a training forward for token
    distillation."""

    def __init__(self, state: StageSettings) -> None:
        self.state = state

    def __call__(self, norm: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if norm.training:
            self.state.record.final_tokens = output
