"""Runtime state of one DynamicViT-patched model: its settings, what a forward leaves,
and how its predictors, hooks and weighted attentions go in and out."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from evit_patch.core.dense import install_dense_refusal, uninstall_dense_entry_points
from evit_patch.core.key_weighting import KeyWeights
from evit_patch.core.lifecycle import PatchState
from evit_patch.core.model_info import transformer_blocks
from evit_patch.core.per_call import PerCall
from evit_patch.core.positions import SequenceInput
from evit_patch.dynamicvit.positions import FollowingPositions
from evit_patch.dynamicvit.stages import FinalTokens, ForwardRecord, StagePruner

PREDICTORS_ATTRIBUTE = "dynamicvit_predictors"
"""The submodule holding the keep predictors (their ``state_dict`` keys start with it)."""


@dataclass(eq=False)
class DynamicViTState(PatchState):
    """Settings shared by the stage hooks of one model (not globals, so a model and its EMA
    copy never see each other's decisions), the record of each thread's last forward
    (concurrent calls never see each other's), and what patching replaced. How it goes in
    and out is :mod:`evit_patch.dynamicvit.patch`'s."""

    layers: list[int]
    keep_rate: float
    num_prefix_tokens: int
    key_weights: KeyWeights
    original_attentions: dict[int, nn.Module]
    weighted_attentions: dict[int, nn.Module]
    predictors: nn.ModuleList
    final_norm: nn.Module
    positions: dict[str, SequenceInput] = field(default_factory=dict)  # block inputs sized to the sequence
    handles: list[RemovableHandle] = field(default_factory=list)
    call: PerCall = field(default_factory=PerCall)  # what the forward running in each thread left

    method = "DynamicViT"
    removal = "remove_dynamicvit(model)"

    def install(self, model: nn.Module) -> None:
        blocks = transformer_blocks(model)
        for index, attention in self.weighted_attentions.items():
            blocks[index].attn = attention
        setattr(model, PREDICTORS_ATTRIBUTE, self.predictors)
        self.handles = [
            blocks[index].register_forward_pre_hook(StagePruner(self, self.predictors[stage], stage))
            for stage, index in enumerate(self.layers)
        ]
        if self.positions:  # after the stage pruners, which they read
            self.handles += [
                block.register_forward_pre_hook(FollowingPositions(self, self.positions, _parameter_places(block)),
                                                with_kwargs=True)
                for block in list(blocks)[self.layers[0]:]
            ]
        self.handles.append(self.final_norm.register_forward_hook(FinalTokens(self)))
        install_dense_refusal(model)

    def uninstall(self, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        blocks = transformer_blocks(model)
        for index, attention in self.original_attentions.items():
            attention.training = blocks[index].attn.training  # train()/eval() since patching reached the rewrite only
            blocks[index].attn = attention
        self.key_weights.weights = None
        delattr(model, PREDICTORS_ATTRIBUTE)
        uninstall_dense_entry_points(model)

    @property
    def record(self) -> ForwardRecord:
        """What the calling thread's last forward left (empty before its first)."""
        record = self.call.get("record")
        if record is None:
            record = ForwardRecord()
            self.call.set("record", record)
        return record

    @record.setter
    def record(self, record: ForwardRecord) -> None:
        self.call.set("record", record)

    @property
    def keep_ratio(self) -> float:
        """The former name of :attr:`keep_rate` (deprecated; warns)."""
        warnings.warn("DynamicViTState.keep_ratio is now keep_rate; keep_ratio goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return self.keep_rate

    def keep_fractions(self) -> list[float]:
        """Fraction of the original image tokens each stage keeps: rho, rho^2, rho^3, ..."""
        return [self.keep_rate ** (stage + 1) for stage in range(len(self.layers))]

    def kept_count(self, num_image_tokens: int, stage: int) -> int:
        """``int(N * rho^(stage+1))`` of the float product, as the official DynamicViT code
        counts (so ``0.7**2 * 100 = 48.99999999999999`` keeps 48, as there), and at least 1."""
        return max(1, int(num_image_tokens * self.keep_fractions()[stage]))


def _parameter_places(block: nn.Module) -> dict[str, int]:
    """Where each input of ``block.forward`` comes among its positional arguments."""
    return {name: place for place, name in enumerate(inspect.signature(block.forward).parameters)}
