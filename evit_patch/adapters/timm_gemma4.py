"""timm's Gemma 4 vision towers (``gemma4_vit_*``): ``Gemma4VitEncoder`` and the classifier around it.

Only what differs from timm's ViTs is here: the blocks are the encoder's (``model.encoder.blocks`` in
the classifier), there is no prefix token (scores are the mean attention each patch receives), and
every block takes its rotary embedding as two inputs, ``rope_cos`` and ``rope_sin`` ``(B, N, D)``,
which follow the kept tokens (:class:`RotaryHalf`). Padded patches (``patch_valid``, ``-1``
coordinates) make the encoder hand every block a key padding mask, and its pooling and the
classifier's head read the full grid's padding after the blocks: a patched tower refuses such a call
in one line (:func:`unpadded`). The soft-token pooler of the ``_enc`` towers bins the blocks' output
by the full grid, so towers built with it are refused.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from timm.layers.pos_embed_sincos import apply_keep_indices_nlc
from torch import Tensor, nn

from evit_patch.core.fx_graph import call_as_leaf
from evit_patch.core.model_info import ModelFamily
from evit_patch.core.positions import MixableInput, SequenceInput
from evit_patch.core.scores import ScoreMode
from evit_patch.errors import UnsupportedModelError

_MODULE = "timm.models.gemma4_vit"
_MASK = "attn_mask"
_SOFT_POOL = ("its forward reads the blocks' output as the full patch grid (the soft-token pooler bins every patch by "
              "its grid coordinates), which fewer tokens cannot fill; build it with global_pool='avg' or 'none' "
              "(the classifier: encoder_pool='')")


class RotaryHalf(MixableInput):
    """One half of a rotary pair passed on its own, ``cos`` or ``sin`` ``(B, N, D)`` for the N patch
    tokens (no prefix token). Rows are gathered by timm's ``apply_keep_indices_nlc``, as its
    ``PatchDropout`` gathers tables; a token with no position gets ``unrotated`` (cos 1, sin 0)."""

    kind = "rotary position embeddings"

    def __init__(self, unrotated: float) -> None:
        self.unrotated = unrotated

    def follow(self, value: Tensor, origin: Tensor) -> Tensor:
        extended = torch.cat([value, torch.full_like(value[:, :1], self.unrotated)], 1)
        index = torch.where(origin < 0, value.shape[1], origin)
        return apply_keep_indices_nlc(origin, extended, index, pos_embed_has_batch=True)

    def mix(self, value: Tensor, members: Tensor) -> Tensor:
        """The weighted mean of the members' rows (a rotation is linear in its cos and sin)."""
        return torch.einsum("bmn,bnd->bmd", members.to(value.dtype), value)

    def __repr__(self) -> str:
        return f"RotaryHalf(unrotated={self.unrotated})"


@torch.fx.wrap
def unpadded(mask: Optional[Tensor], model_name: str) -> None:
    """Refuse a forward whose encoder made a padding mask (the first reorganizing block calls it,
    before its attention; recorded as one call by a torch.fx trace of the model)."""
    if mask is not None:
        raise ValueError(f"{model_name} is EViT-patched: padded patches (patch_valid False, or -1 coordinates) give a "
                         "padding mask over the full patch grid, which its blocks and its pooling read and fewer tokens "
                         "cannot serve; pass unpadded patches or images, or remove_evit(model) first")


class Gemma4Family(ModelFamily):
    """timm's ``gemma4_vit_*`` towers (see the module docstring)."""

    name = "timm gemma4"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__ == _MODULE

    def _encoder(self, model: nn.Module) -> nn.Module:
        """The ``Gemma4VitEncoder`` (the classifier's ``encoder``), refused with the soft-token pooler."""
        encoder = getattr(model, "encoder", model)
        if encoder.global_pool == "soft":
            raise UnsupportedModelError(self.model_name(model), _SOFT_POOL)
        return encoder

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self._encoder(model).blocks

    def prefix_token_count(self, model: nn.Module) -> int:
        return self._encoder(model).num_prefix_tokens

    def score_mode(self, model: nn.Module) -> ScoreMode:
        return "mean"

    def takes_any_input_size(self, model: nn.Module) -> bool:
        """Patchified inline, positions looked up per patch: any multiple of the patch size."""
        return True

    def input_module(self, model: nn.Module) -> nn.Module:
        return self._encoder(model).patch_embed

    def sequence_inputs(self, model: nn.Module) -> dict[str, Optional[SequenceInput]]:
        """``rope_cos`` and ``rope_sin``, which the encoder passes every block in their places."""
        self._encoder(model)
        return {"rope_cos": RotaryHalf(1.0), "rope_sin": RotaryHalf(0.0)}

    def rewrite_block(self, block: nn.Module, reorganizer: nn.Module, model_name: str,
                      positions: Mapping[str, Optional[nn.Module]] | None = None) -> nn.Module:
        """timm's rewrite, which refuses ``attn_mask`` at the reorganizer; the padding mask is refused first,
        with what makes it (:func:`unpadded`)."""
        patched = super().rewrite_block(block, reorganizer, model_name, positions)
        graph = patched.graph
        (mask,) = [node for node in graph.nodes if node.op == "placeholder" and node.target == _MASK]
        first = next(node for node in graph.nodes if node.op != "placeholder")
        with graph.inserting_before(first):
            call_as_leaf(graph, unpadded, (mask, model_name))
        patched.recompile()
        return patched


GEMMA4 = Gemma4Family()

__all__ = ["GEMMA4", "Gemma4Family", "RotaryHalf", "unpadded"]
