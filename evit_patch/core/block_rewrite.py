"""Insert a token reorganizer into a transformer block's own graph.

The block is traced with its children as leaves; its attention call is swapped for
the scored attention, and the reorganizer goes right after the residual add of the
block input and the attention branch, so the MLP (and everything after) runs on the
shorter sequence. LayerScale, drop-path, post-norm and other block options are
whatever the block's own graph says.
"""

from __future__ import annotations

import operator
from typing import Callable, Collection, Mapping, Optional

import torch
import torch.fx as fx
from torch import nn

from evit_patch.core.fx_graph import (
    ancestors,
    descendants,
    extra_forward_parameters,
    order_children_as,
    trace_own_forward,
)
from evit_patch.core.scored_attention import scored_attention
from evit_patch.errors import UnsupportedModelError

_MASK_PARAMETERS = {"attn_mask", "is_causal", "attention_mask", "interpolate_pos_encoding"}
"""Block inputs refused unless None or False (transformers' BEiT layer interpolates its bias to the sequence length)."""
_ROTARY = ("rotary position embeddings in a form its family does not follow (timm's `Eva` tables do; see "
           "docs/positions.md)")
_RELATIVE = ("a relative position bias sized to the full token grid in a form its family does not follow (timm's BEiT "
             "and ViT-RelPos biases are; see docs/positions.md)")
_GRID = "its blocks take the patch grid's height and width (convolutions over the full token grid)"
_KNOWN_POSITION_INPUTS = {
    "rope": _ROTARY,
    "rope_cos": _ROTARY,
    "rope_sin": _ROTARY,
    "H": _GRID,
    "W": _GRID,
    "rel_pos_bias": _RELATIVE,
    "shared_rel_pos_bias": _RELATIVE,
    "shared_rel_pos": _RELATIVE,
}
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)


def check_block_inputs(block: nn.Module, model_name: str, positions: Collection[str] = ()) -> None:
    """Refuse blocks that take inputs sized to the full token sequence (rotary or relative positions)
    other than ``positions``, those the model's family makes follow the kept tokens."""
    for parameter in extra_forward_parameters(block):
        if parameter.name in positions:
            continue
        if parameter.name in _KNOWN_POSITION_INPUTS:
            raise UnsupportedModelError(model_name, _KNOWN_POSITION_INPUTS[parameter.name])
        if parameter.name not in _MASK_PARAMETERS:
            raise UnsupportedModelError(
                model_name, f"its block {type(block).__name__} takes an unknown input {parameter.name!r}"
            )


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _attention_residual_add(graph: fx.Graph, block_input: fx.Node, attention_output: fx.Node) -> fx.Node | None:
    """The add ``block_input + f(attention_output)``: the insertion point."""
    downstream = descendants(attention_output)
    for node in graph.nodes:
        if node in downstream and _is_add(node) and block_input in node.args[:2]:
            other = node.args[1] if node.args[0] is block_input else node.args[0]
            if other is attention_output or other in downstream:
                return node
    return None


def reorganizing_block(block: nn.Module, reorganizer: nn.Module, model_name: str, attention_name: str = "attn",
                       score: Callable[[nn.Module, str], nn.Module] = scored_attention,
                       positions: Mapping[str, Optional[nn.Module]] | None = None,
                       used_inputs: Collection[str] = (), attention_keywords: Collection[str] = ()) -> fx.GraphModule:
    """A GraphModule sharing ``block``'s submodules, with ``reorganizer`` after attention.

    ``attention_name`` is the block's attention child, called with the tokens and the block's
    inputs named in ``positions`` (sized to the token sequence: a rotary table), each first given
    to its module there (children ``follow_<name>``), which makes it follow the tokens the block
    holds (a name mapped to None: an input the model always passes as None, checked like a mask);
    ``score`` turns it into a module returning ``(its output, AttentionTensors)`` and taking those
    inputs (a family whose attention torch.fx cannot trace brings its own). ``used_inputs``: block inputs the
    block's graph uses as it says, and ``attention_keywords``: arguments of the attention call kept as the
    block computes them (transformers' BEiT: the image ``resolution`` a layer builds its bias from, and that
    bias, handed to the attention as ``attention_mask``, which the scored attention makes follow the tokens)."""
    attention = getattr(block, attention_name, None)
    if not isinstance(attention, nn.Module):
        raise UnsupportedModelError(model_name, f"its block {type(block).__name__} has no `{attention_name}` submodule")
    positions = positions or {}
    check_block_inputs(block, model_name, (*positions, *used_inputs))
    try:
        graph = trace_own_forward(block)
    except Exception as error:  # torch.fx raises many kinds of errors on untraceable code
        raise UnsupportedModelError(
            model_name, f"its block {type(block).__name__} cannot be traced by torch.fx ({error})"
        ) from error

    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    block_input = placeholders[0]
    position_inputs = [node for node in placeholders[1:] if positions.get(node.target) is not None]
    mask_inputs = [node for node in placeholders[1:]
                   if positions.get(node.target) is None and node.target not in used_inputs]
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == attention_name]
    if len(calls) != 1:
        raise UnsupportedModelError(model_name, f"its block calls its attention {len(calls)} times")
    call = calls[0]
    kept = {name: value for name, value in call.kwargs.items() if name in attention_keywords}
    passed = _position_arguments(call, position_inputs, attention, model_name)
    call.args, call.kwargs = call.args[:1], {**passed, **kept}
    for keyword, node in passed.items():
        with graph.inserting_before(call):
            call.update_kwarg(keyword, graph.call_module(f"follow_{node.target}", (node, block_input)))
    if any(node.users for node in mask_inputs):  # the reorganizer rejects masks at run time
        raise UnsupportedModelError(model_name, "its block uses the attention mask outside the attention")
    with graph.inserting_after(call):
        output = graph.call_function(operator.getitem, (call, 0))
    with graph.inserting_after(output):
        tensors = graph.call_function(operator.getitem, (call, 1))
    call.replace_all_uses_with(output, delete_user_cb=lambda user: user not in (output, tensors))

    residual = _attention_residual_add(graph, block_input, output)
    feeds_attention = ancestors(call) | {call}
    if residual is None or any(
        user is not residual and user not in feeds_attention for user in block_input.users
    ):
        raise UnsupportedModelError(
            model_name,
            f"its block {type(block).__name__} has no residual add of the block input and the "
            "attention branch before the MLP (parallel attention/MLP blocks have no such point)",
        )
    with graph.inserting_after(residual):
        reorganized = graph.call_module(
            "token_reorganizer", (residual, tensors), {node.target: node for node in mask_inputs}
        )
    residual.replace_all_uses_with(reorganized, delete_user_cb=lambda user: user is not reorganized)
    graph.lint()

    children = {
        node.target: block.get_submodule(node.target) if node.op == "call_module" else _fetch(block, node.target)
        for node in graph.nodes
        if node.op in ("call_module", "get_attr") and node.target != "token_reorganizer"
        and not node.target.startswith("follow_")
    }
    children[attention_name] = score(attention, model_name)
    children["token_reorganizer"] = reorganizer
    children.update({f"follow_{name}": follower for name, follower in positions.items()})
    patched = fx.GraphModule(children, graph, class_name=f"Reorganizing{type(block).__name__}")
    order_children_as(patched, block)
    patched.training = block.training
    return patched


def _position_arguments(call: fx.Node, position_inputs: list[fx.Node], attention: nn.Module,
                        model_name: str) -> dict[str, fx.Node]:
    """The attention call's arguments that pass the block's position inputs on as they are, by keyword or in
    their place after the tokens (timm's gemma4: ``attn(x, rope_cos, rope_sin)``), as keyword arguments; that
    must be the only use of them (a table used elsewhere, or changed first, would not follow the tokens)."""
    places = [parameter.name for parameter in extra_forward_parameters(attention)]
    arguments = {**dict(zip(places, call.args[1:])), **call.kwargs}
    passed = {name: value for name, value in arguments.items() if value in position_inputs}
    for node in position_inputs:
        if set(node.users) - {call} or list(passed.values()).count(node) != 1:
            raise UnsupportedModelError(model_name, f"its block uses its input {node.target!r} other than by passing "
                                                    "it to its attention once")
    return passed


def _fetch(module: nn.Module, qualified_name: str) -> object:
    for part in qualified_name.split("."):
        module = getattr(module, part)
    return module
