"""Oracle-guided EViT: a trained model decides which tokens are attentive.

The paper's analysis: a frozen, fully trained ViT (the oracle) sees every patch, and its
class attention at each reorganization layer says which tokens the student keeps and
with which weights it fuses the rest; the student starts from the oracle's weights.
A token the student holds at a layer is scored by the oracle's attention to the patches
inside it, so a fused token is scored as the sum of its patches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from evit_patch.core.eval_mode import eval_mode
from evit_patch.core.per_call import PerCall
from evit_patch.core.reduction import LayerContext, Reduction, TokenReducer, identity_reduction
from evit_patch.core.scores import AttentionTensors
from evit_patch.core.token_patch import apply_token_reducer
from evit_patch.reducers.counting import kept_token_count
from evit_patch.reducers.evit import evit_reduction
from evit_patch.reducers.registry import TokenMethod, register_token_method


class ScoreRecorder(TokenReducer):
    """Keeps every token and records each layer's attentiveness scores (the oracle's side),
    per forward (:class:`~evit_patch.core.per_call.PerCall`)."""

    name = "score-recorder"

    def __init__(self) -> None:
        self.call = PerCall()

    @property
    def scores(self) -> dict[int, Tensor]:
        """The scores of each layer position from the calling thread's last forward."""
        return self.call.get("scores", {})

    def start_forward(self, images: Tensor, training: bool) -> None:
        self.call.set("scores", {})

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        self.scores[context.position] = context.scores(attention)
        return identity_reduction(x, context.num_prefix_tokens)


def oracle_scorer(oracle: nn.Module, layers: Sequence[int]) -> tuple[nn.Module, ScoreRecorder]:
    """A frozen copy of ``oracle`` that records its scores at ``layers`` on every forward."""
    recorder = ScoreRecorder()
    frozen = copy.deepcopy(oracle).eval().requires_grad_(False)
    apply_token_reducer(frozen, layers, 1.0, recorder)
    return frozen, recorder


class OracleGuided(TokenReducer):
    """EViT whose keep and fuse decisions follow a frozen oracle's class attention.

    Args:
        oracle: an unpatched, trained model of the student's token grid; a frozen copy is
            kept (outside the student's ``state_dict``).
        layers: the student's reorganization layers; the oracle is read at the same blocks.
        at_eval: use the oracle in eval mode too (the paper's analysis); False falls back
            to the student's own class attention there, which is what deployment runs.
    """

    def __init__(self, oracle: nn.Module, layers: Sequence[int], at_eval: bool = True) -> None:
        self.oracle, self.recorder = oracle_scorer(oracle, layers)
        self.at_eval = at_eval
        self.name = "oracle" + ("" if at_eval else "(own attention at eval)")
        self.call = PerCall()  # the token holding each patch, in the forward running in each thread

    def start_forward(self, images: Tensor, training: bool) -> None:
        self.call.set("patch_token", None)
        self.recorder.start_forward(images, training)
        if not (training or self.at_eval):  # the student's own attention decides: no oracle forward
            return
        parameter = next(self.oracle.parameters())
        if (parameter.device, parameter.dtype) != (images.device, images.dtype):  # follows the student's .to()
            self.oracle.to(images.device, images.dtype)
        with torch.no_grad(), eval_mode(self.oracle):
            self.oracle(images)

    def current_scores(self, oracle_scores: Tensor, num_tokens: int) -> Tensor:
        """The oracle's score of each token the student holds now ``(B, n)``."""
        patch_token = self.call.get("patch_token")
        if patch_token is None:
            patch_token = torch.arange(oracle_scores.shape[1], device=oracle_scores.device).expand_as(oracle_scores)
            self.call.set("patch_token", patch_token)
        alive = patch_token >= 0
        scores = oracle_scores.new_zeros(oracle_scores.shape[0], num_tokens)
        return scores.scatter_add(1, patch_token.clamp(min=0), oracle_scores * alive)

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        num_image = x.shape[1] - context.num_prefix_tokens
        if kept_token_count(num_image, context.keep_rate) >= num_image:
            reduction = identity_reduction(x, context.num_prefix_tokens)
        elif context.training or self.at_eval:
            oracle_scores = self.recorder.scores.get(context.position)
            if oracle_scores is None or oracle_scores.shape[0] != x.shape[0]:
                raise RuntimeError("the oracle has not seen these images: call the patched model itself "
                                   "(model(images)), whose forward runs the oracle first")
            scores = self.current_scores(oracle_scores, num_image)
            reduction = evit_reduction(x, scores, context.num_prefix_tokens, context.keep_rate,
                                       top_member=context.top_member)
        else:
            reduction = evit_reduction(x, context.scores(attention), context.num_prefix_tokens, context.keep_rate,
                                       top_member=context.top_member)
        patch_token = self.call.get("patch_token")
        if patch_token is not None:
            alive = patch_token >= 0
            moved = reduction.destination.gather(1, patch_token.clamp(min=0))
            self.call.set("patch_token", torch.where(alive, moved, -1))
        return reduction


@dataclass(frozen=True)
class OracleOptions:
    """``oracle_at_eval``: the oracle decides at evaluation too (else the model's own attention)."""

    oracle_at_eval: bool = True


def oracle_guided(oracle: nn.Module, layers: Sequence[int], oracle_at_eval: bool = True) -> OracleGuided:
    """The ``oracle`` method's reducer: ``oracle`` is a trained model, ``layers`` the student's."""
    return OracleGuided(oracle, layers, at_eval=oracle_at_eval)


register_token_method(TokenMethod("oracle", "oracle-guided EViT", oracle_guided, OracleOptions, needs=("oracle", "layers")))
