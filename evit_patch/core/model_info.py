"""What evit_patch needs to know about a model: its blocks, prefix tokens, input size.

Each answer comes from the model's family: :class:`ModelFamily` itself is timm's ViTs,
and adapters for other libraries (``evit_patch.adapters``) subclass it and are put first
with :func:`register_family`. The core names no library but timm's defaults.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Optional

import torch
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import Tensor, nn

from evit_patch.core.attention_bias import bias_following_attention
from evit_patch.core.block_rewrite import reorganizing_block
from evit_patch.core.positions import ATTENTION_BIAS, RelativeBias, RotaryTable, SequenceInput
from evit_patch.core.scored_attention import scored_attention
from evit_patch.core.scores import ScoreMode
from evit_patch.errors import UnsupportedModelError


class ModelFamily:
    """How one family of ViTs is read and rewritten; this base class is timm's ViTs.

    An adapter overrides what differs (where the blocks are, the prefix count, how a
    block's attention is called and scored, what the output holds) and claims its
    models with :meth:`matches`.
    """

    name = "timm"
    library: Optional[str] = None
    """The top-level package whose model classes the family claims (None: any model)."""
    key_weighting = True
    """Whether attentions can weight their keys (ToMe's proportional attention, DynamicViT)."""
    attention_name = "attn"
    """A block's attention child, which a copy whose bias follows the tokens (or that weights keys) replaces."""

    def matches(self, model: nn.Module) -> bool:
        return self.library is None or type(model).__module__.split(".")[0] == self.library

    def model_name(self, model: nn.Module) -> str:
        return _timm_model_name(model)

    def blocks(self, model: nn.Module) -> nn.Sequential | nn.ModuleList:
        return _timm_blocks(model)

    def prefix_token_count(self, model: nn.Module) -> int:
        return _timm_prefix_token_count(model)

    def score_mode(self, model: nn.Module) -> ScoreMode:
        return _timm_score_mode(model)

    def native_input_shape(self, model: nn.Module) -> Optional[tuple[int, int, int]]:
        return _timm_native_input_shape(model)

    def takes_any_input_size(self, model: nn.Module) -> bool:
        """Whether the model runs images of any size as it is (timm: built with ``dynamic_img_size``)."""
        return bool(getattr(model, "dynamic_img_size", False))

    def patch_count(self, model: nn.Module) -> Optional[int]:
        """Patch tokens the first block sees (None when it cannot be told)."""
        patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        return patches if isinstance(patches, int) else None

    def input_module(self, model: nn.Module) -> nn.Module:
        """The module that takes the images first, whatever entry point runs the model
        (``model(x)``, ``forward_features``, ``forward_intermediates``): timm's patch
        embedding (``embeds`` for NaFlex ViTs); the model itself when it has neither."""
        for name in ("patch_embed", "embeds"):
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                return module
        return model

    def sequence_inputs(self, model: nn.Module) -> dict[str, Optional[SequenceInput]]:
        """The blocks' inputs sized to the image-token sequence, by name, and how each follows a
        reduction: later blocks get them for the tokens that remain (None: the model always passes
        None there, so the blocks are traced without it). :data:`ATTENTION_BIAS` names the bias each
        attention computes itself. timm: ``rope``, the rotary table ``Eva`` passes every block
        (``blk(x, rope=rope)``), None where the model makes no table (EVA-01); BEiT's and ViT-RelPos's
        relative position bias, shared by the model (a block input) or each attention's own."""
        if isinstance(model, Eva):
            return {"rope": None if model.rope is None else RotaryTable()}
        if isinstance(model, (Beit, VisionTransformerRelPos)):
            return _timm_relative_bias_inputs(model)
        if isinstance(getattr(model, "rope", None), nn.Module):
            raise UnsupportedModelError(model_name(model), _GRID_AFTER_BLOCKS)
        return {}

    def rewrite_block(self, block: nn.Module, reorganizer: nn.Module, model_name: str,
                      positions: Mapping[str, Optional[nn.Module]] | None = None) -> nn.Module:
        """``block`` with ``reorganizer`` after its attention residual (see :mod:`evit_patch.core.block_rewrite`);
        ``positions``: a module per input of :meth:`sequence_inputs`, which makes it follow the tokens the
        block holds before its attention takes it (None: an input always None); the one for
        :data:`ATTENTION_BIAS` goes into the attention, on the bias it computes."""
        positions = dict(positions or {})
        bias = positions.pop(ATTENTION_BIAS, None)
        names = tuple(name for name, follower in positions.items() if follower is not None)
        return reorganizing_block(block, reorganizer, model_name,
                                  score=partial(scored_attention, positions=names, bias=bias), positions=positions)

    def bias_following_attention(self, attention: nn.Module, follower: nn.Module, model_name: str,
                                 positions: tuple[str, ...] = ()) -> nn.Module:
        """``attention`` (of a block not rewritten, after the first reduction layer) as a copy whose
        bias goes through ``follower`` (see :mod:`evit_patch.core.attention_bias`); it takes the block
        inputs ``positions`` as the original does."""
        return bias_following_attention(attention, follower, model_name, positions)

    def replacement_hooks(self, model: nn.Module, replacements: dict[int, nn.Module]) -> dict[int, list[Callable]]:
        """Forward hooks for ``replacements`` (block index -> rewritten block), asked for just
        before they take their places among ``model``'s blocks: a library that hooks its own
        block class (transformers records ``hidden_states`` so) gives the rewritten blocks the
        same. The patch registers them, again after unpickling (a GraphModule's hooks are not
        pickled). timm: none."""
        return {}

    def restore_originals(self, model: nn.Module, originals: dict[int, nn.Module]) -> None:
        """Called once ``originals`` (block index -> original block) are back among ``model``'s
        blocks: hooks the library installed on its blocks while they were out get onto them
        too. timm: nothing."""

    def output_tensor(self, output: Any) -> Tensor:
        """The tensor a training loss or a benchmark reads from the model's output (timm: the output)."""
        return output


_GRID_AFTER_BLOCKS = ("its forward reads the blocks' output as the full patch grid (a vision-language tower: "
                      "`x.reshape(B, H, W, -1)` before its patch merger or pooling), which fewer tokens cannot fill")

_BOTH_BIASES = ("it adds a relative position bias shared by the model to each attention's own; following the sum is "
                "not implemented (build it with use_shared_rel_pos_bias or use_rel_pos_bias, not both)")


def _timm_relative_bias_inputs(model: Beit | VisionTransformerRelPos) -> dict[str, Optional[SequenceInput]]:
    """BEiT (``shared_rel_pos_bias``, per-attention ``relative_position_bias_table``) and ViT-RelPos
    (``shared_rel_pos``, per-attention ``rel_pos``): each bias covers the prefix tokens too."""
    beit = isinstance(model, Beit)
    shared = model.rel_pos_bias if beit else model.shared_rel_pos
    own = any((block.attn.relative_position_bias_table if beit else block.attn.rel_pos) is not None
              for block in model.blocks)
    if shared is not None and own:
        raise UnsupportedModelError(model_name(model), _BOTH_BIASES)
    follow = RelativeBias(model.num_prefix_tokens)
    inputs: dict[str, Optional[SequenceInput]] = {
        "shared_rel_pos_bias" if beit else "shared_rel_pos": None if shared is None else follow}
    return {**inputs, ATTENTION_BIAS: follow} if own else inputs


TIMM = ModelFamily()
_FAMILIES: list[ModelFamily] = []


def register_family(family: ModelFamily) -> None:
    """Let ``family`` claim the models it matches, before the families registered earlier."""
    if family not in _FAMILIES:
        _FAMILIES.insert(0, family)


def family_of(model: nn.Module) -> ModelFamily:
    """The registered family that claims ``model``; timm's otherwise."""
    return next((family for family in _FAMILIES if family.matches(model)), TIMM)


def model_name(model: nn.Module) -> str:
    """How messages name ``model`` (timm: the architecture name when known, else the class name)."""
    return family_of(model).model_name(model)


def transformer_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The model's sequence of transformer blocks (timm's ``model.blocks``)."""
    return family_of(model).blocks(model)


def prefix_token_count(model: nn.Module) -> int:
    """Class, distillation and register tokens in the sequence the blocks see, which are never
    pruned or fused."""
    return family_of(model).prefix_token_count(model)


def score_mode(model: nn.Module) -> ScoreMode:
    """Class-attention scores when the blocks see a class token, else mean received attention."""
    return family_of(model).score_mode(model)


def native_input_shape(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(C, H, W)`` the model is built for, or None when it cannot be told."""
    return family_of(model).native_input_shape(model)


def takes_any_input_size(model: nn.Module) -> bool:
    """Whether the model runs images of any size as it is, without being resized."""
    return family_of(model).takes_any_input_size(model)


def _timm_model_name(model: nn.Module) -> str:
    """The timm architecture name when known, else the class name."""
    config = getattr(model, "pretrained_cfg", None) or {}
    architecture = config.get("architecture") if isinstance(config, dict) else None
    return f"{architecture} ({type(model).__name__})" if architecture else type(model).__name__


def _timm_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The model's sequence of transformer blocks (timm's ``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise UnsupportedModelError(
            model_name(model), "it has no `blocks` sequence of transformer blocks (not a ViT-style model)"
        )
    return blocks


_LATE_CLASS_TOKEN_STAGES = ("blocks_token_only", "cls_attn_blocks")  # CaiT, XCiT


def class_token_joins_after_blocks(model: nn.Module) -> bool:
    """Whether the class token is added only after ``blocks`` (CaiT's and XCiT's class-attention
    stage): timm counts it in ``num_prefix_tokens``, but the blocks see patch tokens only."""
    return getattr(model, "cls_token", None) is not None and any(
        hasattr(model, stage) for stage in _LATE_CLASS_TOKEN_STAGES
    )


def _timm_prefix_token_count(model: nn.Module) -> int:
    """Class, distillation and register tokens in the sequence ``blocks`` see, which are never
    pruned or fused: timm's ``num_prefix_tokens``, less a class token that joins after ``blocks``."""
    count = getattr(model, "num_prefix_tokens", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise UnsupportedModelError(
            model_name(model), "it has no integer `num_prefix_tokens` telling which tokens are class/register tokens"
        )
    return count - 1 if count > 0 and class_token_joins_after_blocks(model) else count


def _timm_score_mode(model: nn.Module) -> ScoreMode:
    """Class-attention scores when the blocks see a class token, else mean received attention."""
    if class_token_joins_after_blocks(model):
        return "mean"
    has_class_token = getattr(model, "has_class_token", None)
    if has_class_token is None:
        has_class_token = getattr(model, "cls_token", None) is not None
    return "class" if has_class_token else "mean"


def _timm_native_input_shape(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(C, H, W)`` a timm model is built for, or None when it cannot be told."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    in_chans = next(
        (m.in_channels for m in patch_embed.modules() if isinstance(m, nn.Conv2d)), None
    ) if isinstance(patch_embed, nn.Module) else None
    config = getattr(model, "pretrained_cfg", None) or {}
    config_shape = config.get("input_size") if isinstance(config, dict) else None
    if size is None and config_shape is not None:
        size = config_shape[1:]
    if in_chans is None and config_shape is not None:
        in_chans = config_shape[0]
    if size is None or in_chans is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(in_chans), int(height), int(width)


def example_images(model: nn.Module, batch_size: int = 1, img_size: int | tuple[int, int] | None = None, *,
                   seed: Optional[int] = None) -> torch.Tensor:
    """A batch of the model's input shape on its device and dtype: zeros, or standard normal
    noise drawn from ``seed`` (a forward that must really rank tokens needs distinct ones)."""
    shape = native_input_shape(model)
    if shape is None:
        raise ValueError(f"cannot tell the input shape of {model_name(model)}; pass img_size")
    height, width = shape[1:] if img_size is None else (
        (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
    parameter = next(model.parameters())
    size = (batch_size, shape[0], height, width)
    if seed is None:
        return torch.zeros(size, device=parameter.device, dtype=parameter.dtype)
    noise = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return noise.to(parameter.device, parameter.dtype)
