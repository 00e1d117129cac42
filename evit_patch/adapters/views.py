"""Views of another library's modules that torch.fx can trace, and the tracer for them.

A view shares everything of the module it views (children, parameters, buffers and
plain attributes: the very same objects, nothing copied), but its ``forward`` is the
module's own computation called with the tokens alone: without the library's forward
wrapper (transformers' gradient checkpointing) and its ``**kwargs``, which torch.fx
cannot take. A rewrite built from the view's graph therefore names the module's own
children, and ``state_dict`` keys do not change.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Iterator, TypeVar

import torch.fx as fx
from torch import nn

from evit_patch.core.fx_graph import OwnForwardTracer

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def shared_as(module: nn.Module, cls: type[ModuleT]) -> ModuleT:
    """An instance of ``cls`` holding ``module``'s children, parameters, buffers and
    attributes themselves (a later ``train()``/``eval()`` reaches only the one in the model)."""
    view = cls.__new__(cls)
    view.__dict__.update(module.__dict__)
    return view


def computation_view(module: nn.Module, cls: type[ModuleT]) -> ModuleT:
    """A view of ``module`` as ``cls`` (whose ``forward`` calls ``self.computation(self, x)``),
    with the other methods of ``module``'s class (which its forward may call) and its name,
    so that rewrites built from it are named after it too. The class is not subclassed:
    a library's ``__init_subclass__`` (transformers wraps ``forward``) stays out."""
    methods = {name: value for name, value in vars(type(module)).items()
               if inspect.isfunction(value) and not name.startswith("__") and name != "forward"}
    named = type(type(module).__name__, (cls,), {"__module__": cls.__module__, **methods})
    view = shared_as(module, named)
    view.computation = inspect.unwrap(type(module).forward)
    return view


class _SizedProxy(fx.Proxy):
    """A proxy that knows how many entries a token input's shape (or a slice of it) has."""

    def __len__(self) -> int:
        length = _shape_length(self.node)
        if length is None:
            return super().__len__()
        return length


def _shape_length(node: fx.Node) -> int | None:
    """The number of entries of the token input's shape (``x.shape``, ``x.size()``) or of a
    slice of it; None for anything else."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        length = _shape_length(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return None if length is None else len(range(length)[node.args[1]])
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        source = node.args[0]
    elif node.op == "call_method" and node.target == "size" and len(node.args) == 1:
        source = node.args[0]
    else:
        return None
    first_input = next(n for n in node.graph.nodes if n.op == "placeholder")
    return TokenTracer.TOKEN_RANK if source is first_input else None


class TokenTracer(OwnForwardTracer):
    """Trace a view whose first input is a ``(B, N, C)`` token tensor.

    Libraries unpack token shapes (``(*x.shape[:-1], -1, head_dim)``), which plain torch.fx
    cannot take; knowing the input's rank, this tracer's proxies hand out one entry per
    dimension of that shape, and refuse any other iteration as torch.fx does.
    """

    TOKEN_RANK = 3

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        """What torch.fx asks for an iteration other than tuple unpacking (which it serves itself,
        as for ``cos, sin = position_embeddings``): the entries of a token input's shape."""
        length = _shape_length(obj.node)
        if length is None:
            return super().iter(obj)
        return iter([obj[index] for index in range(length)])
