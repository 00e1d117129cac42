"""torch.fx helpers shared by the attention and block rewrites."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn


class OwnForwardTracer(fx.Tracer):
    """Trace only the root module's own ``forward``; every submodule stays one call.

    Keeping children opaque preserves their names (so ``state_dict`` keys do not
    change), their parameters, and any train/eval behaviour inside them (dropout,
    drop-path), which a deeper trace would freeze at trace time. ``proxy_buffers``: buffers are
    read at run time (``get_attr``) even where the forward computes with them first (BEiT's
    ``relative_position_index.view(-1)``), which torch.fx would otherwise store as a new constant.
    """

    def __init__(self, proxy_buffers: bool = False) -> None:
        super().__init__()
        self.proxy_buffer_attributes = proxy_buffers

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._root = root
        return super().trace(root, concrete_args=concrete_args)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return module is not self._root


def trace_own_forward(module: nn.Module, concrete_args: dict[str, Any] | None = None,
                      proxy_buffers: bool = False) -> fx.Graph:
    """Graph of ``module.forward`` with its children as leaves (see :class:`OwnForwardTracer`)."""
    return OwnForwardTracer(proxy_buffers).trace(module, concrete_args=concrete_args)


def call_as_leaf(graph: fx.Graph, function: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A call of ``function`` that a later trace through the generated code (a whole-model torch.fx
    trace, the re-trace that unpickles a GraphModule) records as one call, as torch.fx does for a
    function it traced as ``fx.wrap``'d, instead of running it on Proxies."""
    node = graph.call_function(function, args, kwargs)
    node.meta["is_wrapped"] = True
    return node


def extra_forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    """Parameters of ``module.forward`` after the token input."""
    return list(inspect.signature(module.forward).parameters.values())[1:]


def _reachable(node: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(step(node))
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(step(current))
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """All nodes ``node`` reads from, directly or not."""
    return _reachable(node, lambda current: current.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """All nodes that read ``node``, directly or not."""
    return _reachable(node, lambda current: current.users)


def find_nodes(graph: fx.Graph, op: str, targets: Iterable[Any]) -> list[fx.Node]:
    """Nodes of kind ``op`` whose target is one of ``targets``."""
    wanted = list(targets)
    return [node for node in graph.nodes if node.op == op and any(node.target is t or node.target == t for t in wanted)]


def order_children_as(graph_module: fx.GraphModule, module: nn.Module) -> None:
    """Register ``graph_module``'s children in ``module``'s order (torch.fx registers them in
    call order), so that the ``state_dict`` keys of a rewrite come in the original's order."""
    order = {name: index for index, name in enumerate(module._modules)}
    graph_module._modules = dict(sorted(graph_module._modules.items(), key=lambda item: order.get(item[0], len(order))))


def keep_unsaved_buffers_unsaved(module: nn.Module, source: nn.Module) -> None:
    """Buffers ``source`` leaves out of its ``state_dict`` (timm's ``k_bias``, BEiT's
    ``relative_position_index``) stay out of ``module``'s, a GraphModule built from a dict of
    ``source``'s attributes, where torch.fx registers every tensor as a saved buffer."""
    for name, _ in module.named_buffers():
        owner, _, field = name.rpartition(".")
        origin = source.get_submodule(owner)
        if field in origin._non_persistent_buffers_set:
            module.get_submodule(owner)._non_persistent_buffers_set.add(field)
