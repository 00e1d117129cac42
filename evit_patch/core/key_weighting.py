"""Attention whose keys carry non-negative weights: ``p_ij = exp(l_ij) w_j / sum_k exp(l_ik) w_k``.

A weight of 0 takes a key out of every query's softmax while the sequence keeps its
length (DynamicViT's masking of dropped tokens during training); weights equal to token
sizes give proportional attention (merged tokens count as many). The rewrite replaces
only the attention module's one ``scaled_dot_product_attention`` call (or its explicit
softmax) and leaves everything else of the module's own traced forward alone; with no
weights set it calls exactly what the module called, fused kernel included.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Collection, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from evit_patch.core.fx_graph import call_as_leaf, extra_forward_parameters, keep_unsaved_buffers_unsaved
from evit_patch.core.per_call import PerCall
from evit_patch.core.scored_attention import attention_graph, attention_node, is_fused_attention
from evit_patch.core.scores import at_least_float32
from evit_patch.errors import UnsupportedModelError

HOLDER_NAME = "key_weights"


class KeyWeights(nn.Module):
    """The key weights every rewritten attention of one model reads.

    Parameter-free and shared: set ``weights`` to a ``(B, N)`` tensor of non-negative
    weights over all keys of the current sequence (prefix tokens included) before the
    forward, or to None for plain attention. The weights belong to the forward running in
    the calling thread (:class:`~evit_patch.core.per_call.PerCall`), so concurrent calls
    of one model never read each other's. ``self_loop`` counts each query's own key with
    weight 1 whatever its weight, so a query whose key is weighted 0 still attends to
    something (DynamicViT); ``eps`` keeps the normalizer away from 0.
    """

    def __init__(self, self_loop: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.self_loop = self_loop
        self.eps = eps
        self.call = PerCall()

    @property
    def weights(self) -> Optional[Tensor]:
        return self.call.get("weights")

    @weights.setter
    def weights(self, weights: Optional[Tensor]) -> None:
        self.call.set("weights", weights)

    def log_mask(self, dtype: torch.dtype) -> Tensor:
        """``log weights`` as an additive attention mask ``(B, 1, 1, N)`` in ``dtype``,
        computed once for all the attentions that read the same weights."""
        weights = self.weights
        cached = self.call.get("log_mask")
        if cached is None or cached[0] is not weights or cached[1] != dtype:
            log_weights = weights.to(dtype).clamp_min(torch.finfo(dtype).tiny).log()
            cached = (weights, dtype, log_weights[:, None, None, :])
            self.call.set("log_mask", cached)
        return cached[2]

    def __deepcopy__(self, memo: dict) -> "KeyWeights":
        """A copy with no weights set: they belong to one forward of the original."""
        clone = KeyWeights(self.self_loop, self.eps).train(self.training)
        memo[id(self)] = clone
        return clone

    def extra_repr(self) -> str:
        return f"self_loop={self.self_loop}, eps={self.eps}"


def _check_weights_shape(weights: Tensor, batch: int, keys: int) -> None:
    if weights.shape != (batch, keys):
        raise ValueError(
            f"KeyWeights.weights has shape {tuple(weights.shape)}, but the attention has a batch of {batch} "
            f"with {keys} keys; set weights of shape ({batch}, {keys}), prefix tokens included"
        )


def weighted_softmax(logits: Tensor, weights: Tensor, self_loop: bool = False, eps: float = 0.0) -> Tensor:
    """``exp(l_ij) w_j / (sum_k exp(l_ik) w_k + eps)`` over the last axis of ``(B, H, Nq, Nk)``
    logits with ``(B, Nk)`` key weights, in at least float32; gradients reach the weights.
    ``self_loop`` counts ``w_ii`` as 1."""
    batch, _, queries, keys = logits.shape
    _check_weights_shape(weights, batch, keys)
    precision = at_least_float32(logits.dtype)
    logits = logits.to(precision)
    weights = weights.to(precision)[:, None, None, :]
    if self_loop:
        diagonal = torch.eye(queries, keys, dtype=precision, device=logits.device)
        weights = weights + (1 - weights) * diagonal
    exponentials = (logits - logits.amax(dim=-1, keepdim=True).detach()).exp() * weights
    return exponentials / (exponentials.sum(dim=-1, keepdim=True) + eps)


def key_weighted_sdpa(holder: KeyWeights, query: Tensor, key: Tensor, value: Tensor,
                      attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: Optional[float] = None, **options: Any) -> Tensor:
    """``F.scaled_dot_product_attention`` itself without weights; with weights that need
    gradients or a self-loop, the weighted attention computed explicitly; with constant
    weights, the same attention with ``log w`` added to the logits (``eps`` unused). An additive
    ``attn_mask`` (a relative position bias) is added to the logits in both."""
    if holder.weights is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **options)
    if (attn_mask is not None and attn_mask.dtype == torch.bool) or is_causal or any(options.values()):
        raise ValueError("key-weighted attention takes no boolean attn_mask, is_causal or other attention options; "
                         "set KeyWeights.weights = None to call the attention with them")
    weights = holder.weights
    if not (weights.requires_grad or holder.self_loop):  # e.g. token sizes: log-weights as a mask, fused kernel kept
        _check_weights_shape(weights, query.shape[0], key.shape[-2])
        mask = holder.log_mask(query.dtype)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask if attn_mask is None else attn_mask + mask,
                                              dropout_p=dropout_p, scale=scale)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query @ key.transpose(-2, -1)) * scale
    probabilities = weighted_softmax(logits if attn_mask is None else logits + attn_mask, holder.weights,
                                     holder.self_loop, holder.eps)
    probabilities = F.dropout(probabilities, dropout_p) if dropout_p > 0 else probabilities
    return probabilities.to(value.dtype) @ value


def key_weighted_softmax(holder: KeyWeights, logits: Tensor, dim: int = -1) -> Tensor:
    """``logits.softmax(dim)`` without weights, else the weighted softmax over the keys."""
    if holder.weights is None:
        return logits.softmax(dim)
    if dim not in (-1, logits.ndim - 1):
        raise ValueError(f"key-weighted attention normalizes over the last (key) axis, got softmax over dim {dim}")
    return weighted_softmax(logits, holder.weights, holder.self_loop, holder.eps).to(logits.dtype)


def _softmax_dim(node: fx.Node, model_name: str) -> int:
    """The ``dim`` of a traced softmax call (``x.softmax(-1)``, ``F.softmax(x, dim=-1)``, ...)."""
    if any(name not in ("dim", "_stacklevel") for name in node.kwargs) or len(node.args) > 2:
        raise UnsupportedModelError(model_name, f"its attention softmax takes options key weighting cannot keep "
                                                f"({node.format_node()})")
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)


def _replace_attention(graph: fx.Graph, node: fx.Node, model_name: str) -> None:
    with graph.inserting_before(node):
        holder = graph.get_attr(HOLDER_NAME)
        if is_fused_attention(node):
            weighted = call_as_leaf(graph, key_weighted_sdpa, (holder, *node.args), dict(node.kwargs))
        else:
            weighted = call_as_leaf(graph, key_weighted_softmax, (holder, node.args[0]),
                                    {"dim": _softmax_dim(node, model_name)})
    node.replace_all_uses_with(weighted)
    graph.erase_node(node)


def refuse_traced_away_inputs(names: tuple, defaults: tuple, *values: Any) -> None:
    """The attention was traced with these inputs fixed at their defaults."""
    for name, default, value in zip(names, defaults, values):
        if value is not default and value != default:
            raise ValueError(f"a key-weighted attention was traced with {name}={default!r} and cannot take another "
                             f"{name}; call it without {name}")


def accept_traced_away_inputs(graph: fx.Graph, attention: nn.Module, positions: Collection[str]) -> None:
    """Put back, as defaulted inputs after the others, the mask parameters the trace fixed (all but ``positions``,
    which stayed inputs), so callers such as timm's ``Block`` can keep passing ``attn_mask=None, is_causal=False``
    (gemma4's in its place, after the rotary inputs)."""
    parameters = [parameter for parameter in extra_forward_parameters(attention) if parameter.name not in positions]
    if not parameters:
        return
    inputs = []
    anchor = [node for node in graph.nodes if node.op == "placeholder"][-1]
    for parameter in parameters:
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(parameter.name, default_value=parameter.default)
        inputs.append(anchor)
    with graph.inserting_after(anchor):
        call_as_leaf(graph, refuse_traced_away_inputs,
                     (tuple(p.name for p in parameters), tuple(p.default for p in parameters), *inputs))


def weighted_key_attention(attention: nn.Module, holder: KeyWeights, model_name: str,
                           positions: Collection[str] = ()) -> fx.GraphModule:
    """A GraphModule sharing ``attention``'s submodules that weights its keys by ``holder``.

    ``attention`` is a timm-style attention module, or a GraphModule made from one (e.g.
    :func:`evit_patch.core.scored_attention.scored_attention`, whose ``(output, tensors)`` output is
    kept as it is). ``state_dict`` keys are unchanged; ``holder`` adds none.
    """
    if isinstance(attention, fx.GraphModule):
        graph = copy.deepcopy(attention.graph)
        node = attention_node(graph, type(attention).__name__, model_name)
    else:
        graph, node = attention_graph(attention, model_name, positions)
        accept_traced_away_inputs(graph, attention, positions)
    _replace_attention(graph, node, model_name)
    graph.lint()
    children = {
        node.target: operator.attrgetter(node.target)(attention)
        for node in graph.nodes
        if node.op in ("call_module", "get_attr") and node.target != HOLDER_NAME
    }
    children[HOLDER_NAME] = holder
    weighted = fx.GraphModule(children, graph, class_name=f"KeyWeighted{type(attention).__name__}")
    keep_unsaved_buffers_unsaved(weighted, attention)
    weighted.training = attention.training
    return weighted

