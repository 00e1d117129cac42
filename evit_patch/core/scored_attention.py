"""Rewrite an attention module so it also hands out per-token scores.

The module's own forward is traced with torch.fx and extended in place: the output
stays exactly what the module computes (fused ``scaled_dot_product_attention`` kept),
and the tensors that token scores are made of (q and k, or the attention matrix and k)
are returned as a second output. Nothing of the
module's code is copied, so q/k norm, gating, scale norm and later timm changes come
along.
"""

from __future__ import annotations

import operator
from typing import Collection, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from evit_patch.core.fx_graph import call_as_leaf, descendants, extra_forward_parameters, find_nodes, trace_own_forward
from evit_patch.core.scores import active_dropout_rate
from evit_patch.errors import UnsupportedModelError

_SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax)
_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul)
_KEY_SEARCH_DEPTH = 8
_PRODUCT_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
_PRODUCT_METHODS = ("matmul", "bmm", "__matmul__")


def _trace_in_eval_mode(attention: nn.Module, positions: Collection[str], proxy_buffers: bool) -> fx.Graph:
    """Trace with the module's own ``training`` flag off.

    timm writes ``dropout_p=self.attn_drop.p if self.training else 0.`` which a trace
    would freeze; tracing in eval gives the constant 0, replaced below by a live read.
    Children keep their flags, so dropout modules still follow ``train()``/``eval()``.
    ``positions`` stay inputs; the others are fixed at their defaults.
    """
    concrete = {}
    for parameter in extra_forward_parameters(attention):
        if parameter.name in positions:
            continue
        if parameter.default is parameter.empty:
            raise UnsupportedModelError(
                type(attention).__name__, f"its attention takes a required input {parameter.name!r}"
            )
        concrete[parameter.name] = parameter.default
    was_training = attention.training
    attention.training = False
    try:
        graph = trace_own_forward(attention, concrete, proxy_buffers)
    finally:
        attention.training = was_training
    _drop_specialized_inputs(graph, positions)
    return graph


def _drop_specialized_inputs(graph: fx.Graph, positions: Collection[str]) -> None:
    """Remove the mask inputs fixed at their defaults and fx's checks of them (all but ``positions``).

    The block calls the scored attention with the tokens alone (it rejects masks
    itself), and a graph without these checks can be pickled and re-traced.
    """
    extras = [node for node in graph.nodes if node.op == "placeholder" and node.target not in positions][1:]
    checks = set().union(*(descendants(node) for node in extras)) if extras else set()
    if any(node.op == "output" for node in checks):
        raise UnsupportedModelError(type(graph.owning_module).__name__, "its attention output depends on a mask input")
    for node in reversed(list(graph.nodes)):
        if node in checks or node in extras:
            graph.erase_node(node)
    graph._tracer_extras = {}


def _make_dropout_live(graph: fx.Graph, sdpa: fx.Node, attention: nn.Module) -> None:
    """Read the fused call's dropout rate from ``attn_drop`` at run time, not at trace time."""
    dropout = getattr(attention, "attn_drop", None)
    if isinstance(dropout, nn.Dropout) and dropout.p > 0:
        with graph.inserting_before(sdpa):
            rate = call_as_leaf(graph, active_dropout_rate, (graph.get_attr("attn_drop"),))
        sdpa.update_kwarg("dropout_p", rate)


def is_fused_attention(node: fx.Node) -> bool:
    """Whether ``node`` is a ``scaled_dot_product_attention`` call (else an explicit softmax)."""
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def attention_node(graph: fx.Graph, owner: str, model_name: str) -> fx.Node:
    """The graph's one attention computation: a fused call or an explicit softmax."""
    fused = find_nodes(graph, "call_function", [F.scaled_dot_product_attention])
    softmax = find_nodes(graph, "call_method", ["softmax"]) + find_nodes(graph, "call_function", _SOFTMAX_FUNCTIONS)
    if len(fused) + len(softmax) != 1:
        raise UnsupportedModelError(
            model_name,
            f"its attention {owner} does not compute one softmax attention "
            f"(found {len(fused)} fused and {len(softmax)} explicit softmax calls)",
        )
    return (fused + softmax)[0]


def attention_graph(attention: nn.Module, model_name: str, positions: Collection[str] = (),
                    proxy_buffers: bool = False) -> tuple[fx.Graph, fx.Node]:
    """The attention module's own graph (mask inputs fixed at their defaults, ``positions`` kept
    as inputs, dropout following ``train()``/``eval()``) and its one attention node, for rewrites to extend;
    ``proxy_buffers``: see :class:`~evit_patch.core.fx_graph.OwnForwardTracer` (for a bias built from an index buffer)."""
    try:
        graph = _trace_in_eval_mode(attention, positions, proxy_buffers)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(model_name, error.reason) from None
    except Exception as error:  # torch.fx raises many kinds of errors on untraceable code
        raise UnsupportedModelError(
            model_name, f"its attention {type(attention).__name__} cannot be traced by torch.fx ({error})"
        ) from error
    node = attention_node(graph, type(attention).__name__, model_name)
    if is_fused_attention(node):
        _make_dropout_live(graph, node, attention)
    return graph, node


def _explicit_key(softmax: fx.Node) -> fx.Node | None:
    """The keys ``k`` of an explicit ``softmax(q @ k.transpose(-2, -1) [* scale] [+ bias])``,
    which merging compares as the fused path's do; None for another form of graph."""
    node = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    for _ in range(_KEY_SEARCH_DEPTH):
        if not isinstance(node, fx.Node):
            return None
        if node.target in _MATMUL_FUNCTIONS or (node.op == "call_method" and node.target == "matmul"):
            transposed = node.args[1] if len(node.args) > 1 else None
            if (isinstance(transposed, fx.Node) and transposed.op == "call_method" and transposed.target == "transpose"
                    and set(transposed.args[1:]) == {-2, -1}):
                return transposed.args[0]
            return None
        node = next((arg for arg in node.args if isinstance(arg, fx.Node)), None)  # through scale, bias, mask
    return None


def _is_value_product_or_dropout(node: fx.Node, attention: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in _PRODUCT_FUNCTIONS or node.target is F.dropout
    if node.op == "call_method":
        return node.target in _PRODUCT_METHODS
    return node.op == "call_module" and isinstance(attention.get_submodule(node.target), nn.Dropout)


def weights_applied_to_values(softmax: fx.Node, attention: nn.Module, model_name: str) -> fx.Node:
    """The post-softmax attention the values are multiplied by (before attention dropout).

    In plain attention that is the softmax itself; talking-heads attention (CaiT's
    ``proj_w``) mixes the heads again after the softmax, and the mixed weights are what
    the tokens actually receive, so scores are taken from them.
    """
    node = softmax
    while len(node.users) == 1:
        (user,) = node.users
        if _is_value_product_or_dropout(user, attention):
            return node
        node = user
    if node is not softmax:
        raise UnsupportedModelError(
            model_name, f"its attention {type(attention).__name__} transforms the softmax weights into several "
            "results, so the weights the values receive cannot be told")
    return node


BIAS_FOLLOWER = "follow_attention_bias"
"""The child of a rewritten attention that makes the bias it computes follow the tokens it holds."""


def attention_mask(node: fx.Node) -> object:
    """The ``attn_mask`` argument of a fused attention call."""
    return node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)


def follow_attention_bias(module: fx.GraphModule, node: fx.Node, follower: nn.Module, model_name: str) -> None:
    """Hand the ``attn_mask`` the attention computes itself (a relative position bias over the
    full sequence) through ``follower`` (the child :data:`BIAS_FOLLOWER`) with the tokens, in
    ``module``'s graph (recompiled by the caller)."""
    mask = attention_mask(node) if is_fused_attention(node) else None
    if not isinstance(mask, fx.Node) or len(node.args) > 3:
        raise UnsupportedModelError(
            model_name, "its attention adds its relative position bias outside scaled_dot_product_attention's "
            "attn_mask (non-fused attention), where it cannot be made to follow the kept tokens; build it with "
            "fused attention (timm's default: unset TIMM_FUSED_ATTN)")
    module.add_submodule(BIAS_FOLLOWER, follower)
    tokens = next(node for node in module.graph.nodes if node.op == "placeholder")
    with module.graph.inserting_before(node):
        node.update_kwarg("attn_mask", module.graph.call_module(BIAS_FOLLOWER, (mask, tokens)))


def scored_attention(attention: nn.Module, model_name: str, positions: Collection[str] = (),
                     bias: Optional[nn.Module] = None) -> fx.GraphModule:
    """A GraphModule sharing ``attention``'s submodules that returns ``(output, tensors)``
    and takes the tokens and the inputs named ``positions`` (a rotary table). ``bias``: a module
    that makes the bias the attention computes itself follow the tokens it holds (its child
    :data:`BIAS_FOLLOWER`).

    ``tensors`` (:data:`evit_patch.core.scores.AttentionTensors`) are what the attention
    computes anyway (a fused call's ``attn_mask`` among them, which the scores add); no operation
    is added, so a layer that keeps every token costs nothing extra.
    """
    graph, node = attention_graph(attention, model_name, positions, proxy_buffers=bias is not None)
    scored = fx.GraphModule(attention, graph, class_name=f"Scored{type(attention).__name__}")
    if bias is not None:
        follow_attention_bias(scored, node, bias, model_name)
    if is_fused_attention(node):
        query = node.args[0] if len(node.args) > 0 else node.kwargs["query"]
        key = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
        mask = attention_mask(node)
        tensors = (query, key, node.kwargs.get("scale"), None, mask if isinstance(mask, fx.Node) else None)
    else:
        tensors = (None, _explicit_key(node), None, weights_applied_to_values(node, attention, model_name))

    output = next(node for node in graph.nodes if node.op == "output")
    output.args = ((output.args[0], tensors),)
    graph.lint()
    scored.recompile()
    return scored
