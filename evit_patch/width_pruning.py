"""Width pruning of a timm ViT to a MAC budget: attention heads and MLP hidden channels.

The other axis to EViT: EViT runs the same model on fewer tokens, this runs a narrower
model on all of them. Inside every block, whole heads (their q, k and v rows and the
``proj`` columns that read them) and MLP hidden channels (``fc1`` rows, ``fc2`` columns)
are removed, the least important first, with torch-pruning's dependency graph. The
embedding width is kept, so patch embedding, position embedding, norms and head keep
their shapes and the result is still a plain timm model.

Needs torch-pruning (``pip install "evit_patch[prune]"``). MACs are
:func:`evit_patch.count_macs`'s (fvcore's count): torch-pruning's own counter misses
the attention matmuls. Every term of the cost is one width (heads or hidden channels
kept) times sizes that pruning leaves alone, so the cost of a model whose blocks all keep
``k`` heads and ``m`` channels is affine in ``(k, m)``: three exact counts fix it, and
the widths chosen from it are counted again, exactly, before the model is changed.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, Mapping, Optional, Sequence

import torch
from timm.layers import Attention, Mlp
from torch import Tensor, nn

from evit_patch.core.eval_mode import eval_mode
from evit_patch.core.lifecycle import is_patched
from evit_patch.core.model_info import example_images, model_name, transformer_blocks
from evit_patch.cost import count_macs
from evit_patch.errors import UnsupportedModelError
from evit_patch.extras import require

if TYPE_CHECKING:
    import torch_pruning as tp

ImportanceName = Literal["magnitude", "random"]
PrunedShape = dict[str, list[int]]
"""``{"heads": [...], "mlp_hidden": [...]}``: attention heads and MLP hidden channels per block."""

TOLERANCE = 0.03
"""A budget is met when the pruned model costs at most the target and at least this much less."""


def _importance(importance: ImportanceName | tp.importance.Importance) -> tp.importance.Importance:
    """Weight magnitude (L2 over every weight a head or channel owns), random as the
    control, or any torch-pruning importance (e.g. Taylor after a backward pass)."""
    tp = require("torch_pruning", "prune")
    if isinstance(importance, tp.importance.Importance):
        return importance
    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"importance must be 'magnitude', 'random' or a torch_pruning importance, got {importance!r}")


def _prunable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks, each checked to hold a timm ``Attention`` and a timm ``Mlp`` of linear layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError(f"{model_name(model)} is patched with EViT; prune its width before apply_evit, "
                         "or remove_evit(model) first")
    blocks = list(transformer_blocks(model))
    for index, block in enumerate(blocks):
        attention, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if not isinstance(attention, Attention):
            raise UnsupportedModelError(model_name(model), f"blocks.{index}.attn is {type(attention).__name__}, "
                                        "not a timm Attention whose heads can be pruned")
        if getattr(attention, "gate", None) is not None or not isinstance(attention.q_norm, nn.Identity):
            raise UnsupportedModelError(model_name(model), f"blocks.{index}.attn has an output gate or q/k "
                                        "normalization, which torch-pruning cannot narrow by whole heads")
        if not isinstance(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear):
            raise UnsupportedModelError(model_name(model), f"blocks.{index}.mlp is {type(mlp).__name__}, "
                                        "not a timm Mlp of linear layers whose hidden channels can be pruned")
    return blocks


def pruned_shape(model: nn.Module) -> PrunedShape:
    """The heads and MLP hidden channels of every block, as :func:`apply_pruned_shape` takes them."""
    blocks = _prunable_blocks(model)
    return {"heads": [block.attn.num_heads for block in blocks],
            "mlp_hidden": [block.mlp.fc1.out_features for block in blocks]}


def _checked_shape(model: nn.Module, shape: Mapping[str, Sequence[int]]) -> PrunedShape:
    current = pruned_shape(model)
    if not isinstance(shape, Mapping) or set(shape) != set(current):
        raise ValueError(f"shape must be a mapping with exactly the keys {sorted(current)}, got {shape!r}")
    for key, widths in shape.items():
        if not isinstance(widths, Sequence) or len(widths) != len(current[key]):
            raise ValueError(f"shape[{key!r}] must list one width per block ({len(current[key])}), got {widths!r}")
        for index, (width, limit) in enumerate(zip(widths, current[key])):
            if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= limit:
                raise ValueError(f"shape[{key!r}][{index}] must be an integer from 1 to {limit} (block {index} "
                                 f"has {limit}; pruning cannot widen it), got {width!r}")
    return {key: list(shape[key]) for key in current}


def _example_input(model: nn.Module, example_input: Optional[Tensor]) -> Tensor:
    return example_input if example_input is not None else example_images(model)


class _Narrowing:
    """torch-pruning's dependency graph of one model, through which its blocks lose
    heads and hidden channels."""

    def __init__(self, model: nn.Module, example_input: Tensor, importance: tp.importance.Importance) -> None:
        self.tp, self.label, self.importance = require("torch_pruning", "prune"), model_name(model), importance
        self.names = {module: name for name, module in model.named_modules()}
        with eval_mode(model):
            self.graph = self.tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)

    def _group(self, owner: nn.Module, layer: nn.Linear, function, indices: list[int]) -> tp.Group:
        """The dependency group of ``indices``; refused when it reaches outside ``owner``
        (the attention or MLP being narrowed), which would change the embedding width."""
        group = self.graph.get_pruning_group(layer, function, indices)
        inside = set(owner.modules())
        outside = sorted({self.names[dependency.target.module] for dependency, _ in group
                          if dependency.target.module in self.names and dependency.target.module not in inside})
        if outside:
            raise UnsupportedModelError(self.label, f"narrowing {self.names[owner]} would also change {outside}; "
                                        "only heads and MLP channels inside a block are pruned")
        return group

    def heads(self, attention: Attention, keep: int) -> None:
        """Remove all but ``keep`` heads, scored by the mean importance of their channels."""
        head_dim = attention.head_dim
        prune_in = self.tp.prune_linear_in_channels
        group = self._group(attention, attention.proj, prune_in, list(range(attention.attn_dim)))
        dropped = _least_important(self.importance(group).view(attention.num_heads, head_dim).mean(1), keep)
        if dropped:
            channels = [head * head_dim + offset for head in dropped for offset in range(head_dim)]
            self._group(attention, attention.proj, prune_in, channels).prune()
        attention.num_heads = keep
        attention.attn_dim = keep * head_dim

    def hidden(self, mlp: Mlp, keep: int) -> None:
        """Remove all but ``keep`` hidden channels of the MLP."""
        prune_out = self.tp.prune_linear_out_channels
        group = self._group(mlp, mlp.fc1, prune_out, list(range(mlp.fc1.out_features)))
        dropped = _least_important(self.importance(group), keep)
        if dropped:
            self._group(mlp, mlp.fc1, prune_out, dropped).prune()


def _least_important(scores: Tensor, keep: int) -> list[int]:
    """Indices of all but the ``keep`` highest scores, in increasing order."""
    kept = set(torch.topk(scores, keep).indices.tolist())
    return [index for index in range(len(scores)) if index not in kept]


def _pruned_copy(model: nn.Module, shape: PrunedShape, importance: tp.importance.Importance,
                 example_input: Tensor) -> nn.Module:
    """A copy of ``model`` with every block narrowed to ``shape``; ``model`` is not touched."""
    work = copy.deepcopy(model)
    trainable = {name: parameter.requires_grad for name, parameter in work.named_parameters()}
    work.requires_grad_(True)  # the dependency graph is traced through autograd
    narrowing = _Narrowing(work, example_input, importance)
    with torch.no_grad():
        for block, heads, hidden in zip(work.blocks, shape["heads"], shape["mlp_hidden"]):
            narrowing.heads(block.attn, heads)
            narrowing.hidden(block.mlp, hidden)
    for name, parameter in work.named_parameters():
        parameter.requires_grad_(trainable[name])
    return work


def _take_widths(model: nn.Module, pruned: nn.Module) -> None:
    """Move the narrowed attention and MLP modules of ``pruned`` into ``model``."""
    for block, narrow in zip(model.blocks, pruned.blocks):
        block.attn, block.mlp = narrow.attn, narrow.mlp


def apply_pruned_shape(model: nn.Module, shape: Mapping[str, Sequence[int]], *,
                       importance: ImportanceName | tp.importance.Importance = "magnitude",
                       example_input: Optional[Tensor] = None) -> nn.Module:
    """Narrow ``model`` in place to ``shape`` (see :func:`pruned_shape`), the least
    important heads and channels first, and return it.

    Rebuilds a pruned architecture for loading its weights: a fresh
    ``timm.create_model(...)`` narrowed to the saved shape takes the pruned state_dict.
    On any error the model is left as it was.
    """
    scorer = _importance(importance)
    widths = _checked_shape(model, shape)
    _take_widths(model, _pruned_copy(model, widths, scorer, _example_input(model, example_input)))
    return model


class _UniformCost:
    """The exact MACs of ``model`` with every block keeping ``heads`` heads and ``hidden``
    channels, from three counts: unpruned, one head, one head and one channel."""

    def __init__(self, model: nn.Module, full: float, example_input: Tensor) -> None:
        shape = pruned_shape(model)
        self.heads, self.hidden, depth = shape["heads"][0], shape["mlp_hidden"][0], len(shape["heads"])

        def cost(heads: int, hidden: int) -> Fraction:
            narrow = {"heads": [heads] * depth, "mlp_hidden": [hidden] * depth}
            return Fraction(count_macs(_pruned_copy(model, narrow, _importance("magnitude"), example_input)))

        one_head = cost(1, self.hidden) if self.heads > 1 else Fraction(full)
        self.cheapest = cost(1, 1) if self.hidden > 1 else one_head
        self.per_head = (Fraction(full) - one_head) / (self.heads - 1) if self.heads > 1 else Fraction(0)
        self.per_channel = (one_head - self.cheapest) / (self.hidden - 1) if self.hidden > 1 else Fraction(0)

    def __call__(self, heads: int, hidden: int) -> Fraction:
        return self.cheapest + self.per_head * (heads - 1) + self.per_channel * (hidden - 1)

    def widest_hidden(self, heads: int, target: Fraction) -> int:
        """The most hidden channels that fit ``target`` with ``heads`` heads (0: none fit)."""
        if self(heads, 1) > target:
            return 0
        if self.per_channel == 0:
            return self.hidden
        return min(self.hidden, 1 + math.floor((target - self(heads, 1)) / self.per_channel))


def _balanced_widths(cost: _UniformCost, target: float) -> tuple[int, int]:
    """Heads and hidden channels costing at most ``target``: of the head counts whose
    widest fitting MLP comes within the tolerance, the one pruning heads and channels
    at the most nearly equal ratio (the uniform ratio, as far as whole heads allow)."""
    budget = Fraction(target)
    options = [(heads, cost.widest_hidden(heads, budget)) for heads in range(1, cost.heads + 1)]
    options = [(heads, hidden) for heads, hidden in options if hidden > 0]
    close = [option for option in options if cost(*option) >= (1 - TOLERANCE) * budget]
    if not close:  # none within the tolerance: the closest, which the final check reports
        return max(options, key=lambda option: cost(*option))
    return min(close, key=lambda option: (abs(option[0] / cost.heads - option[1] / cost.hidden), -cost(*option)))


def prune_to_macs(model: nn.Module, target_macs: float, *,
                  importance: ImportanceName | tp.importance.Importance = "magnitude",
                  example_input: Optional[Tensor] = None) -> nn.Module:
    """Narrow ``model`` in place so that ``count_macs(model)`` is at most ``target_macs``
    and within 3% of it, pruning heads and MLP hidden channels of every block together.

    Every block keeps the same heads and channels, chosen as near a uniform pruning ratio
    of both as whole heads allow. ``example_input`` is only traced (default: a zero image
    of the model's native size); MACs are counted at the native size. A target below the
    cost of one head and one channel per block (what embedding, norms and head cost) or
    more than 3% above the unpruned cost raises ``ValueError``; a model already within
    the budget is returned as it is. On any error the model is left as it was.
    """
    scorer = _importance(importance)
    shape = pruned_shape(model)
    if len(set(shape["heads"])) != 1 or len(set(shape["mlp_hidden"])) != 1:
        raise ValueError(f"prune_to_macs needs the same widths in every block, got {shape}; "
                         "use apply_pruned_shape for per-block widths")
    if not isinstance(target_macs, (int, float)) or isinstance(target_macs, bool) or not target_macs > 0:
        raise ValueError(f"target_macs must be a positive number of multiply-accumulates, got {target_macs!r}")
    example = _example_input(model, example_input)
    full = count_macs(model)
    if target_macs >= full:
        if target_macs > (1 + TOLERANCE) * full:
            raise ValueError(f"target {target_macs / 1e9:.4f} GMACs is above the unpruned cost of "
                             f"{model_name(model)}, {full / 1e9:.4f} GMACs; pruning only lowers it")
        return model
    cost = _UniformCost(model, full, example)
    if target_macs < cost.cheapest:
        raise ValueError(f"target {target_macs / 1e9:.4f} GMACs is unreachable: with one head and one MLP channel "
                         f"per block {model_name(model)} still costs {float(cost.cheapest) / 1e9:.4f} GMACs "
                         "(patch embedding, norms and head are not pruned); choose a larger target")
    heads, hidden = _balanced_widths(cost, target_macs)
    depth = len(shape["heads"])
    pruned = _pruned_copy(model, {"heads": [heads] * depth, "mlp_hidden": [hidden] * depth}, scorer, example)
    reached = count_macs(pruned)
    if not (1 - TOLERANCE) * target_macs <= reached <= target_macs:
        raise ValueError(f"no width of whole heads and channels costs within {TOLERANCE:.0%} below "
                         f"{target_macs / 1e9:.4f} GMACs; the closest, {heads} heads and {hidden} channels per "
                         f"block, costs {reached / 1e9:.4f} GMACs")
    _take_widths(model, pruned)
    return model
