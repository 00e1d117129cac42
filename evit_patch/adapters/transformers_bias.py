"""Hugging Face BEiT's relative position bias, made to follow the kept tokens.

transformers' ``BeitModel`` builds a bias over the full sequence (class token first, then the patch
grid) from the image resolution, either once for all layers (``use_shared_relative_position_bias``,
handed to every layer as ``attention_mask``) or in each layer from its own table
(``use_relative_position_bias``, from the ``resolution`` the model passes on); a layer hands it to
its attention as ``attention_mask``. After a reorganizing layer the later attentions get its rows and
columns for the tokens that remain (:class:`~evit_patch.core.positions.RelativeBias`, as timm's BEiT):
the family declares the bias under :data:`~evit_patch.core.positions.ATTENTION_BIAS`, and each
attention from the first reorganizing layer on puts the ``attention_mask`` it is handed through the
follower first. The layers are rewritten from views that pass on what the bias is built from.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from evit_patch.core.positions import ATTENTION_BIAS, RelativeBias, SequenceInput
from evit_patch.errors import UnsupportedModelError

BIAS_KEYWORD = "attention_mask"
"""How a BEiT layer hands its attention the bias."""

_BOTH = ("it adds a relative position bias shared by the model to each layer's own; following the sum is not "
         "implemented (build it with use_shared_relative_position_bias or use_relative_position_bias, not both)")


class SharedBiasLayerView(nn.Module):
    """A BEiT layer called with the tokens and the bias its model shares among layers (``attention_mask``)."""

    used_inputs = (BIAS_KEYWORD,)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Any:
        return self.computation(self, hidden_states, attention_mask=attention_mask)


class OwnBiasLayerView(nn.Module):
    """A BEiT layer that builds its own bias from the image ``resolution``. A mask, and the flag that
    would interpolate the bias to the (shortened) sequence length, are refused at run time as masks are;
    without the flag the bias is the full grid's, as the unpatched layer's interpolation to its full
    length leaves it."""

    used_inputs = ("resolution",)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                interpolate_pos_encoding: bool = False, resolution: Optional[tuple[int, int]] = None) -> Any:
        return self.computation(self, hidden_states, resolution=resolution)


def bias_layer_view(layer: nn.Module) -> type[nn.Module]:
    """The view a BEiT layer is rewritten from: its own bias, or the model's shared one."""
    return SharedBiasLayerView if getattr(layer, "relative_position_bias", None) is None else OwnBiasLayerView


def relative_bias_inputs(base: nn.Module, layers: nn.ModuleList, model_name: str,
                         prefix_tokens: int) -> dict[str, Optional[SequenceInput]]:
    """``{ATTENTION_BIAS: RelativeBias}`` for a BEiT base model with a shared bias (``shared_position_bias``)
    or layers with their own (``relative_position_bias``); nothing for one with neither."""
    shared = getattr(base, "shared_position_bias", None) is not None
    own = any(getattr(layer, "relative_position_bias", None) is not None for layer in layers)
    if shared and own:
        raise UnsupportedModelError(model_name, _BOTH)
    return {ATTENTION_BIAS: RelativeBias(prefix_tokens)} if shared or own else {}
