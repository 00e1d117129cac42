"""The module a token reducer runs in, and the state its layers share on one model."""

from __future__ import annotations

import bisect
import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch.fx
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from evit_patch.core.arguments import validated_keep_rates
from evit_patch.core.dense import DEFAULT_FILL, install_dense_entry_points, uninstall_dense_entry_points
from evit_patch.core.lifecycle import PatchState
from evit_patch.core.model_info import family_of, model_name, transformer_blocks
from evit_patch.core.per_call import PerCall
from evit_patch.core.positions import ATTENTION_BIAS, PositionRule, SequenceInput, composed_membership, composed_origin, member_weights
from evit_patch.core.reduction import LayerContext, TokenMap, TokenReducer
from evit_patch.core.restoration import Fill
from evit_patch.core.scores import AttentionTensors, ScoreMode
from evit_patch.errors import UnsupportedModelError

KEEP_RATE_ATTRIBUTE = "keep_rate"
"""The attribute a patched model shows its keep rate under; assigning it changes the rate
from the next forward on, as ``model.r = 16`` does for ToMe."""


@dataclass(eq=False)
class ReductionState(PatchState):
    """What every reduction layer of a model reads and writes, and what patching replaced.

    One object per patched model (not globals), so two patched models, or a model
    and its EMA copy, never see each other's keep rate. What a forward records belongs to
    that call (:attr:`call`, one per thread): concurrent calls never see each other's.
    """

    layers: list[int]
    keep_rates: list[float]
    reducer: TokenReducer
    num_prefix_tokens: int
    score_mode: ScoreMode
    patched_blocks: dict[int, nn.Module] = field(default_factory=dict)
    original_blocks: dict[int, nn.Module] = field(default_factory=dict)
    original_attentions: dict[int, nn.Module] = field(default_factory=dict)  # of blocks not rewritten whose attention is
    weighted_attentions: dict[int, nn.Module] = field(default_factory=dict)  # swapped (key weights, a followed bias)
    call: PerCall = field(default_factory=PerCall)  # what the forward running in each thread recorded
    replacement_hooks: dict[int, list[Callable]] = field(default_factory=dict)  # the family's, on the rewritten blocks
    input_hook: Optional[RemovableHandle] = None  # the input module's pre-hook calling start_forward
    owner: Optional[nn.Module] = None  # the patched model, whose ``keep_rate`` attribute is read each forward
    published_keep_rate: Any = None  # what ``model.keep_rate`` held when last read or set
    restoration: Fill = DEFAULT_FILL  # how dense outputs fill patches that are not their own token (core/dense.py)
    positions: dict[str, SequenceInput] = field(default_factory=dict)  # block inputs sized to the sequence, by name
    position_hooks: list[RemovableHandle] = field(default_factory=list)  # pre-hooks of later blocks not rewritten
    position_rule: PositionRule = "representative"  # where a token that stands for several sits (the reducer's default)

    def __post_init__(self) -> None:
        self.method = f"EViT's token reorganization (reducer {self.reducer.describe()})"
        self.clear_record()

    def install(self, model: nn.Module) -> None:
        blocks = transformer_blocks(model)
        self.replacement_hooks = family_of(model).replacement_hooks(model, self.patched_blocks)
        self.register_replacement_hooks()
        for index, block in self.patched_blocks.items():
            blocks[index] = block
        attention_name = family_of(model).attention_name
        for index, attention in self.weighted_attentions.items():
            setattr(blocks[index], attention_name, attention)
        self.input_hook = family_of(model).input_module(model).register_forward_pre_hook(
            self.start_forward, with_kwargs=True)
        if set(self.positions) - {ATTENTION_BIAS}:
            self.position_hooks = [
                blocks[index].register_forward_pre_hook(
                    FollowingHook(self.followers(self.stage_of(index), self.reorganizers()[0], block_inputs=True),
                                  _parameter_places(blocks[index])),
                    with_kwargs=True)
                for index in range(self.layers[0] + 1, len(blocks)) if index not in self.patched_blocks
            ]
        if not hasattr(model, KEEP_RATE_ATTRIBUTE):  # a model with its own ``keep_rate`` keeps it
            self.owner = model
            self.publish_keep_rate()
        install_dense_entry_points(model)

    def register_replacement_hooks(self) -> None:
        for index, hooks in self.replacement_hooks.items():
            for hook in hooks:
                self.patched_blocks[index].register_forward_hook(hook)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled: the rewritten blocks get their hooks back (a GraphModule's are not pickled)."""
        self.__dict__.update(state)
        self.register_replacement_hooks()

    def uninstall(self, model: nn.Module) -> None:
        blocks = transformer_blocks(model)
        for index, block in self.original_blocks.items():
            block.train(blocks[index].training)  # train()/eval() since patching reached the rewrite only
            blocks[index] = block
        attention_name = family_of(model).attention_name
        for index, attention in self.original_attentions.items():
            attention.training = getattr(blocks[index], attention_name).training  # train()/eval() reached the copy only
            setattr(blocks[index], attention_name, attention)
        family_of(model).restore_originals(model, self.original_blocks)
        self.input_hook.remove()
        for hook in self.position_hooks:
            hook.remove()
        self.position_hooks = []
        if self.owner is not None:
            model.__dict__.pop(KEEP_RATE_ATTRIBUTE, None)
            self.owner = None
        uninstall_dense_entry_points(model)

    @contextlib.contextmanager
    def probe_settings(self, model: nn.Module) -> Iterator[None]:
        """Keep rates of at most 0.5, so the test forward really shortens the sequence; and
        a check that the blocks up to the first reorganization see the patches plus the
        prefix tokens (a class token that joins between blocks, or any other token timm
        does not count, would be scored and fused as an image token)."""
        rates = list(self.keep_rates)
        self.keep_rates[:] = [min(rate, 0.5) for rate in rates]
        lengths: list[int] = []
        hooks = [block.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
                 for block in transformer_blocks(model)[: self.layers[0] + 1]]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self.keep_rates[:] = rates
            self.clear_record()
        patches = family_of(model).patch_count(model)
        if isinstance(patches, int) and any(length != patches + self.num_prefix_tokens for length in lengths):
            raise UnsupportedModelError(
                model_name(model), f"its blocks see {sorted(set(lengths))} tokens, not its {patches} patches plus "
                f"{self.num_prefix_tokens} prefix tokens (timm's num_prefix_tokens), so which tokens are "
                "class/register tokens cannot be told")

    @property
    def records(self) -> list[Optional[TokenMap]]:
        """The token map of each reduction layer from the calling thread's last forward
        (None for a layer it has not reached)."""
        records = self.call.get("records")
        return [None] * len(self.layers) if records is None else records

    def clear_record(self) -> None:
        """A new forward starts in the calling thread: nothing recorded yet."""
        self.call.set("records", [None] * len(self.layers))
        self.call.set("origins", [None])  # stage s: where the image tokens after s layers came from (None: all, in order)
        self.call.set("memberships", [None])  # stage s: the token holding each grid token (None: each in its place)
        self.call.set("followed", {})  # (stage, input name): (the table a block was given, its rows followed)

    def followers(self, stage: int, reorganizer: "TokenReorganizer", block_inputs: bool = False) -> list[FollowedInput]:
        """One :class:`FollowedInput` per input sized to the sequence, after ``stage`` layers (``block_inputs``:
        those the blocks take only, not the bias the attentions compute)."""
        return [FollowedInput(reorganizer, stage, name) for name in self.positions
                if not (block_inputs and name == ATTENTION_BIAS)]

    def stage_of(self, index: int) -> int:
        """How many reduction layers run before block ``index``."""
        return bisect.bisect_left(self.layers, index)

    def followed_input(self, stage: int, name: str, value: Tensor) -> Tensor:
        """The block input ``name`` (sized to the full sequence) for the image tokens that
        remain after ``stage`` reduction layers of this forward; gathered once per stage and table."""
        followed = self.call.get("followed")
        cached = followed.get((stage, name))
        if cached is not None and cached[0] is value:
            return cached[1]
        if self.position_rule == "members":
            result = self._mixed_input(stage, name, value)
        else:
            origins = self.call.get("origins")
            records = self.records
            top_member = self.position_rule == "top-member"
            while len(origins) <= stage:
                origins.append(composed_origin(origins[-1], records[len(origins) - 1], top_member))
            result = value if origins[stage] is None else self.positions[name].follow(value, origins[stage])
        followed[(stage, name)] = (value, result)
        return result

    def _mixed_input(self, stage: int, name: str, value: Tensor) -> Tensor:
        """``value`` for the tokens after ``stage`` layers by the position rule ``members``."""
        memberships = self.call.get("memberships")
        records = self.records
        while len(memberships) <= stage:
            memberships.append(composed_membership(memberships[-1], records[len(memberships) - 1]))
        if memberships[stage] is None:
            return value
        record = records[stage - 1]
        tokens = record.kept_index.shape[1] + int(record.fused)
        return self.positions[name].mix(value, member_weights(memberships[stage], tokens))

    def set_keep_rates(self, keep_rate: float | Sequence[float]) -> None:
        """Validate and apply ``keep_rate`` (one float or one per layer), and show it as
        ``model.keep_rate``."""
        self.keep_rates[:] = validated_keep_rates(keep_rate, len(self.layers))
        self.publish_keep_rate()

    def publish_keep_rate(self) -> None:
        if self.owner is not None:
            rates = list(self.keep_rates)
            value = rates[0] if len(set(rates)) == 1 else rates
            setattr(self.owner, KEEP_RATE_ATTRIBUTE, value)
            self.published_keep_rate = copy.copy(value)

    def start_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[tuple[tuple, dict]]:
        """Pre-hook of the module that takes the images (:meth:`ModelFamily.input_module`),
        so that every entry point (``model(x)``, keyword calls, ``forward_features``,
        ``forward_intermediates``, ``encode_image``) starts a forward afresh: a new record,
        the reducer's per-forward state reset, and a keep rate assigned to
        ``model.keep_rate`` since the last forward taken up. Under a torch.fx trace (the images a
        Proxy) it is recorded as one call instead (:func:`forward_started`), run by the traced graph."""
        if args and isinstance(args[0], torch.fx.Proxy):
            return (forward_started(self.reorganizers()[0], module, args[0]), *args[1:]), kwargs
        if self.owner is not None:
            current = getattr(self.owner, KEEP_RATE_ATTRIBUTE, None)
            if current != self.published_keep_rate:
                self.set_keep_rates(current)
        self.clear_record()
        images = next((value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)), None)
        if images is not None:
            self.reducer.start_forward(images, module.training)

    def reorganizers(self) -> list["TokenReorganizer"]:
        return [module for block in self.patched_blocks.values() for module in block.modules()
                if isinstance(module, TokenReorganizer)]

    def context(self, position: int, training: bool) -> LayerContext:
        return LayerContext(position, self.layers[position], self.keep_rates[position], self.num_prefix_tokens,
                            self.score_mode, training, self.position_rule == "top-member")


def _parameter_places(block: nn.Module) -> dict[str, int]:
    """Where each input of ``block.forward`` comes among its positional arguments."""
    return {name: place for place, name in enumerate(inspect.signature(block.forward).parameters)}


class FollowedInput(nn.Module):
    """An input sized to the image-token sequence (``name``: a rotary table, a relative position bias),
    for the tokens that remain after ``stage`` reduction layers of the running forward. A rewritten block
    calls it on its input (a child, so it pickles with the block); other blocks through :class:`FollowingHook`;
    an attention on the bias it computes (its child ``follow_attention_bias``).
    ``reorganizer``, one installed in the model, holds the state; a torch.fx trace of the model names it."""

    def __init__(self, reorganizer: "TokenReorganizer", stage: int, name: str) -> None:
        super().__init__()
        self.reorganizer, self.stage, self.name = reorganizer, stage, name

    def forward(self, value: Optional[Tensor], tokens: Tensor) -> Optional[Tensor]:
        return self.follow(value, tokens)

    def follow(self, value: Optional[Tensor], tokens: Tensor) -> Optional[Tensor]:
        """What ``forward`` gives for ``value`` and the block's ``tokens``, also where the module is not
        installed in the model (in a hook, whose module calls a torch.fx trace of the model could not name)."""
        return value if value is None else follow_input(self.reorganizer, self.stage, self.name, value, tokens)

    def extra_repr(self) -> str:
        return f"{self.name!r} after {self.stage} reduction layers"


class FollowingHook:
    """The forward pre-hook of a block that is not rewritten, after the first reduction layer:
    its inputs sized to the sequence, passed by keyword or in their place, are swapped for those
    of the tokens that remain."""

    def __init__(self, followers: list[FollowedInput], places: dict[str, int]) -> None:
        self.followers, self.places = followers, places

    def __call__(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        tokens = args[0] if args else next(iter(kwargs.values()))
        for follower in self.followers:
            place = self.places.get(follower.name, len(args))
            if place < len(args):
                args[place] = follower.follow(args[place], tokens)
            elif follower.name in kwargs:
                kwargs[follower.name] = follower.follow(kwargs[follower.name], tokens)
        return tuple(args), kwargs


class TokenReorganizer(nn.Module):
    """The module inserted between a block's attention residual and its MLP.

    It holds no parameter or buffer; it hands the tokens to the model's reducer with
    this layer's context and records what the reducer did, for
    :func:`evit_patch.kept_tokens`.
    """

    def __init__(self, state: ReductionState, position: int) -> None:
        super().__init__()
        self.state = state
        self.position = position

    def forward(self, x: Tensor, attention: AttentionTensors, **masks: Any) -> Tensor:
        return reorganize(self, x, attention, masks)

    def reorganize(self, x: Tensor, attention: tuple, masks: dict[str, Any]) -> Tensor:
        """``attention``: the four tensors the rewritten attention returns, handed to the reducer
        as :class:`AttentionTensors`. ``masks``: the block's mask inputs (``attn_mask``,
        ``is_causal``, ``attention_mask``), which must be absent: a mask sized to the full
        sequence cannot follow the kept tokens."""
        if any(mask is not None and mask is not False for mask in masks.values()):
            raise ValueError(
                f"an EViT-patched block shortens the token sequence, so {' / '.join(masks)} "
                "cannot be applied; call the model without them, or remove_evit(model) first"
            )
        state = self.state
        reduction = state.reducer.reduce(x, AttentionTensors(*attention), state.context(self.position, self.training))
        records = state.call.get("records")
        if records is None:  # a block run without the model's input module: a forward of its own
            state.clear_record()
            records = state.call.get("records")
        records[self.position] = reduction.map
        return reduction.tokens

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` calls on every module first: refused in one line."""
        raise RuntimeError("torch.jit.script cannot compile an EViT-patched model (its token reduction is Python); "
                           "use torch.compile or torch.export, or remove_evit(model) first")

    def extra_repr(self) -> str:
        state = self.state
        return f"block={state.layers[self.position]}, keep_rate={state.keep_rates[self.position]}, " \
               f"reducer={state.reducer.describe()}"



@torch.fx.wrap
def reorganize(reorganizer: TokenReorganizer, x: Tensor, attention: AttentionTensors, masks: dict[str, Any]) -> Tensor:
    """:meth:`TokenReorganizer.reorganize`, which a torch.fx trace of the model (timm's and torchvision's
    feature extractors) records as one call: the reducers' shape logic and the mask check run with the real
    tensors (a traced ``attn_mask`` input is refused only when it holds a mask)."""
    return reorganizer.reorganize(x, attention, masks)


@torch.fx.wrap
def follow_input(reorganizer: TokenReorganizer, stage: int, name: str, value: Tensor, tokens: Tensor) -> Tensor:
    """:meth:`ReductionState.followed_input`, which a torch.fx trace of the model records as one call.
    ``tokens`` (the sequence the block holds) ties it to the forward: in a trace the table is often a
    constant (a buffer), and torch.fx records a wrapped call only when one of its arguments is traced."""
    return reorganizer.state.followed_input(stage, name, value)


@torch.fx.wrap
def forward_started(reorganizer: TokenReorganizer, module: nn.Module, images: Tensor) -> Tensor:
    """``images``, after :meth:`ReductionState.start_forward` ran for them: the start of a forward in a
    traced graph, where the input module's pre-hook ran at trace time only."""
    reorganizer.state.start_forward(module, (images,), {})
    return images
