"""open_clip's ``VisionTransformer``: the image tower of every CLIP model (``model.visual``).

Only what differs from timm is here: the blocks are ``transformer.resblocks``; the one
prefix token is the class embedding; the default block's attention is an
``nn.MultiheadAttention``, which runs as itself (its fused path kept) while the class
token's query and every key are projected beside it for the scores; a block built with
open_clip's own ``Attention`` (q/k norm, cosine attention) is rewritten as timm's are.
``open_clip`` is imported only once a model of it is given.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from evit_patch.adapters.views import computation_view, shared_as
from evit_patch.core.block_rewrite import reorganizing_block
from evit_patch.core.model_info import ModelFamily
from evit_patch.core.scores import AttentionTensors, ScoreMode
from evit_patch.errors import UnsupportedModelError


class _BlockView(nn.Module):
    """A residual attention block called with the tokens and an attention mask (which a
    patched block refuses unless it is None)."""

    def forward(self, q_x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        return self.computation(self, q_x)


class ScoredMultiheadAttention(nn.MultiheadAttention):
    """A block's ``nn.MultiheadAttention`` (its very parameters) called with one token
    sequence as query, key and value, returning ``(its output, (q_class, k, None, None))``.

    The output is the module's own (its fast path in inference included); the class
    token's query and all keys are projected again for the scores, one extra key
    projection per reorganizing layer.
    """

    def forward(self, x: Tensor) -> tuple[Any, AttentionTensors]:  # type: ignore[override]
        output = super().forward(x, x, x, need_weights=False)
        width, heads = self.embed_dim, self.num_heads
        bias = self.in_proj_bias
        query = F.linear(x[:, :1], self.in_proj_weight[:width], None if bias is None else bias[:width])
        key = F.linear(x, self.in_proj_weight[width:2 * width], None if bias is None else bias[width:2 * width])
        return output, AttentionTensors(_heads(query, heads), _heads(key, heads), None, None)


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, C)`` to ``(B, H, N, C / H)``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def scored_multihead_attention(attention: nn.Module, model_name: str) -> nn.Module:
    """``attention`` as a :class:`ScoredMultiheadAttention`, refusing what it does not cover."""
    if not isinstance(attention, nn.MultiheadAttention):
        raise UnsupportedModelError(model_name, f"its attention {type(attention).__name__} is not nn.MultiheadAttention")
    if not attention.batch_first:
        raise UnsupportedModelError(model_name, "its attention is not batch_first (tokens along dimension 0)")
    if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
        raise UnsupportedModelError(model_name, "its nn.MultiheadAttention has separate key/value projections, "
                                    "learned key/value biases or a zero-attention slot")
    scored = shared_as(attention, ScoredMultiheadAttention)
    return scored


class OpenClipFamily(ModelFamily):
    """open_clip's VisionTransformer (see the module docstring)."""

    name = "open_clip"
    library = "open_clip"
    key_weighting = False

    def model_name(self, model: nn.Module) -> str:
        return f"open_clip {type(model).__name__}"

    def _tower(self, model: nn.Module) -> nn.Module:
        if isinstance(getattr(model, "visual", None), nn.Module):
            raise UnsupportedModelError(self.model_name(model), "it is a whole CLIP model; patch its image tower: "
                                        "apply_evit(model.visual, layers, keep_rate)")
        if getattr(model, "class_embedding", None) is None or not hasattr(model, "conv1"):
            raise UnsupportedModelError(self.model_name(model), "it is not an open_clip VisionTransformer with a "
                                        "class embedding")
        return model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = getattr(getattr(self._tower(model), "transformer", None), "resblocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(self.model_name(model), "it has no `transformer.resblocks` list of blocks")
        if not getattr(model.transformer, "batch_first", True):
            raise UnsupportedModelError(self.model_name(model), "its transformer runs sequence-first "
                                        "(batch_first=False)")
        return blocks

    def prefix_token_count(self, model: nn.Module) -> int:
        self._tower(model)
        return 1

    def score_mode(self, model: nn.Module) -> ScoreMode:
        return "class"

    def native_input_shape(self, model: nn.Module) -> Optional[tuple[int, int, int]]:
        height, width = self._tower(model).image_size
        return model.conv1.in_channels, int(height), int(width)

    def patch_count(self, model: nn.Module) -> Optional[int]:
        rows, columns = self._tower(model).grid_size
        return int(rows) * int(columns)

    def input_module(self, model: nn.Module) -> nn.Module:
        """The patch convolution, which ``forward`` and ``encode_image`` run first."""
        return self._tower(model).conv1

    def rewrite_block(self, block: nn.Module, reorganizer: nn.Module, model_name: str,
                      positions: Mapping[str, Optional[nn.Module]] | None = None) -> nn.Module:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            return super().rewrite_block(block, reorganizer, model_name, positions)  # open_clip's own Attention: as timm's
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(model_name, "its blocks are cross-attention blocks")
        patched = reorganizing_block(computation_view(block, _BlockView), reorganizer, model_name, "attn",
                                     scored_multihead_attention, positions)
        _take_key_and_value_inputs(patched)
        return patched


def _take_key_and_value_inputs(patched: fx.GraphModule) -> None:
    """Give the patched block the default block's ``(q_x, k_x, v_x, attn_mask)`` inputs (open_clip's
    gradient checkpointing passes them by position); the reorganizer refuses ``k_x``/``v_x``
    other than None, as it refuses a mask."""
    graph = patched.graph
    tokens = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(tokens):
        value = graph.placeholder("v_x", default_value=None)
    with graph.inserting_after(tokens):
        key = graph.placeholder("k_x", default_value=None)
    (call,) = [node for node in graph.nodes if node.op == "call_module" and node.target == "token_reorganizer"]
    call.kwargs = {**call.kwargs, "k_x": key, "v_x": value}
    patched.recompile()


OPEN_CLIP = OpenClipFamily()

__all__ = ["OPEN_CLIP", "OpenClipFamily", "ScoredMultiheadAttention", "scored_multihead_attention"]
