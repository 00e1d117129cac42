"""Hugging Face transformers ViTs: ViT, DeiT (with its distillation token), DINOv2,
DINOv2 with registers, DINOv3 (rotary positions) and BEiT (relative position bias), as
classifiers or bare encoders.

Only what differs from timm is here: the blocks are the base model's ``layers`` (or
``encoder.layer``, ``model.layer``); DINOv3's layers take ``position_embeddings``, a
``(cos, sin)`` pair for the patch grid, made to follow the kept tokens; BEiT's layers hand
their attention a bias over the full sequence, made to follow them too
(:mod:`evit_patch.adapters.transformers_bias`); the prefix tokens
are the embeddings' class, distillation and register tokens; a layer's attention child is
``attention``, and its attention function (SDPA, eager, flash... whatever
``config._attn_implementation`` names) stays one call, looked up at run time as the model
itself does, whose query and key tensors feed the scores; the output tensor is ``.logits``
(or the pooled / last hidden state). ``transformers`` is imported only once a model of it
is given.
"""

from __future__ import annotations

import inspect
import sys
import types
from functools import partial
from typing import Any, Callable, Collection, Mapping, Optional
from unittest import mock

import torch
import torch.fx as fx
from torch import Tensor, nn

from evit_patch.adapters.transformers_bias import BIAS_KEYWORD, bias_layer_view, relative_bias_inputs
from evit_patch.adapters.views import TokenTracer, computation_view
from evit_patch.core.block_rewrite import reorganizing_block
from evit_patch.core.fx_graph import order_children_as
from evit_patch.core.model_info import ModelFamily
from evit_patch.core.positions import ATTENTION_BIAS, MixableInput, RotaryTable, SequenceInput
from evit_patch.core.scored_attention import BIAS_FOLLOWER
from evit_patch.core.scores import ScoreMode
from evit_patch.errors import UnsupportedModelError

SUPPORTED = {"vit": "ViT", "deit": "DeiT", "dinov2": "DINOv2", "dinov2_with_registers": "DINOv2 with registers",
             "dinov3_vit": "DINOv3", "beit": "BEiT"}
"""``config.model_type`` of the families patched, and how the README names them."""

_DATA2VEC = ("a relative position bias sized to the full token grid, which its self-attention adds in its own "
             "softmax or scaled_dot_product_attention call, outside transformers' attention interface: not followed "
             "yet (transformers' and timm's BEiT are; see docs/positions.md)")
REFUSED = {
    "data2vec-vision": _DATA2VEC,
    "vit_mae": "its encoder drops patches at random itself and its decoder restores them by position",
    "vitdet": "windowed attention with a relative position bias over the full token grid",
}
"""Families refused, with the reason."""

_BACKBONE = ("a backbone reshapes every stage's hidden states to the full patch grid, which fewer tokens "
             "cannot fill; patch its base model and read the grid inside `evit_patch.dense_outputs(model)`")
_LEAF = "attention_function"
_ROTARY_INPUT = "position_embeddings"
"""The layer and attention input of the rotary families: ``(cos, sin)`` for the patch tokens."""
_BLOCK_PATHS = ("layers", "encoder.layer", "model.layer")
"""Where a base model holds its list of layers (ViT; DeiT, DINOv2; DINOv3)."""


class RotaryPair(MixableInput):
    """transformers' ``position_embeddings``: ``(cos, sin)``, each ``[N, D]`` for the N patch tokens
    (``apply_rotary_pos_emb`` rotates the last N tokens, so prefix tokens keep theirs). Rows are
    gathered, or mixed by the rule ``members``, as timm's ``[sin | cos]`` tables are; a token with
    no position gets cos 1, sin 0."""

    kind = "rotary position embeddings"

    def follow(self, value: tuple[Tensor, Tensor], origin: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = value
        sin_rows, cos_rows = RotaryTable().follow(torch.cat([sin, cos], -1), origin).chunk(2, -1)
        return cos_rows, sin_rows

    def mix(self, value: tuple[Tensor, Tensor], members: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = value
        sin_rows, cos_rows = RotaryTable().mix(torch.cat([sin, cos], -1), members).chunk(2, -1)
        return cos_rows, sin_rows


class _LayerView(nn.Module):
    """A transformers layer called as its encoder calls it, with the tokens and an
    attention mask (which a patched layer refuses unless it is None)."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Any:
        return self.computation(self, hidden_states)


class _RotaryLayerView(nn.Module):
    """A rotary transformers layer called as its encoder calls it: the tokens, a mask and ``(cos, sin)``."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                position_embeddings: Optional[tuple[Tensor, Tensor]] = None) -> Any:
        return self.computation(self, hidden_states, position_embeddings=position_embeddings)


class _AttentionView(nn.Module):
    """A transformers attention called with the tokens alone."""

    def forward(self, hidden_states: Tensor) -> Any:
        return self.computation(self, hidden_states)


class _BiasAttentionView(nn.Module):
    """A transformers attention called with the tokens and the bias its layer hands it (BEiT's relative
    position bias, as ``attention_mask``)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Any:
        return self.computation(self, hidden_states, attention_mask=attention_mask)


class _RotaryAttentionView(nn.Module):
    """A rotary transformers attention called with the tokens and ``(cos, sin)``."""

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Any:
        return self.computation(self, hidden_states, position_embeddings=position_embeddings)


class AttentionFunction(nn.Module):
    """transformers' attention function as one module: the implementation the model's
    config names now (``model.set_attn_implementation`` is followed), called with this
    module as its ``module`` argument, which carries the attention's attributes
    (``is_causal``, ``scaling``, the shared config) and follows ``train()``/``eval()``
    for the dropout rate. It holds no parameter."""

    def __init__(self, attention: nn.Module, eager: Callable[..., Any], dropout: float) -> None:
        super().__init__()
        for name, value in vars(attention).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.eager = eager
        self.training_dropout = dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor] = None,
                **kwargs: Any) -> Any:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        kwargs["dropout"] = self.training_dropout if self.training else 0.0
        return function(self, query, key, value, attention_mask, **kwargs)


def _traced_attention(attention: nn.Module, model_name: str, positions: Collection[str],
                      bias: Optional[nn.Module]) -> tuple[fx.Graph, fx.Node, dict[str, Any]]:
    """The attention's graph with its attention function one leaf call (see :func:`scored_transformers_attention`),
    the leaf, and the children a GraphModule of it takes. ``bias``: the follower the ``attention_mask`` the
    layer hands the attention goes through first (the child :data:`BIAS_FOLLOWER`)."""
    computation = inspect.unwrap(type(attention).forward)
    modeling = sys.modules[computation.__module__]
    eager = getattr(modeling, "eager_attention_forward", None)
    if not callable(eager):
        raise UnsupportedModelError(model_name, f"its attention {type(attention).__name__} does not call "
                                    "transformers' attention interface")
    calls: list[dict[str, Any]] = []

    def record(module: nn.Module, query: fx.Proxy, key: fx.Proxy, value: fx.Proxy, attention_mask: Any,
               **kwargs: Any) -> tuple[fx.Proxy, fx.Proxy]:
        calls.append(kwargs)
        result = query.tracer.create_proxy("call_module", _LEAF, (query, key, value, attention_mask), kwargs)
        return result[0], result[1]  # (output, weights), as every attention function returns

    kind = _RotaryAttentionView if _ROTARY_INPUT in positions else _AttentionView if bias is None else _BiasAttentionView
    view = computation_view(attention, kind)
    view.config = types.SimpleNamespace(_attn_implementation="eager")
    view.training = True
    try:
        with mock.patch.object(modeling, "eager_attention_forward", record):
            graph = TokenTracer().trace(view)
    except Exception as error:  # torch.fx raises many kinds of errors on untraceable code
        raise UnsupportedModelError(
            model_name, f"its attention {type(attention).__name__} cannot be traced by torch.fx ({error})") from error
    if len(calls) != 1:
        raise UnsupportedModelError(model_name, f"its attention calls the attention function {len(calls)} times")
    (leaf,) = [node for node in graph.nodes if node.op == "call_module" and node.target == _LEAF]
    dropout = leaf.kwargs.get("dropout", 0.0)
    leaf.kwargs = {name: value for name, value in leaf.kwargs.items() if name != "dropout"}
    children: dict[str, Any] = {
        node.target: attention.get_submodule(node.target)
        for node in graph.nodes if node.op == "call_module" and node.target != _LEAF
    }
    children[_LEAF] = AttentionFunction(attention, eager, float(dropout))
    if bias is not None:
        tokens = next(node for node in graph.nodes if node.op == "placeholder")
        with graph.inserting_before(leaf):
            leaf.update_arg(3, graph.call_module(BIAS_FOLLOWER, (leaf.args[3], tokens)))
        children[BIAS_FOLLOWER] = bias
    return graph, leaf, children


def _attention_module(children: dict[str, Any], graph: fx.Graph, attention: nn.Module, kind: str) -> fx.GraphModule:
    graph.lint()
    module = fx.GraphModule(children, graph, class_name=f"{kind}{type(attention).__name__}")
    order_children_as(module, attention)
    module.train(attention.training)
    return module


def scored_transformers_attention(attention: nn.Module, model_name: str, positions: Collection[str] = (),
                                  bias: Optional[nn.Module] = None) -> fx.GraphModule:
    """``attention`` returning ``(its output, (q, k, scaling, None[, bias]))``, taking the tokens and
    ``position_embeddings`` where ``positions`` names it (q and k are then the rotated ones), or with
    ``bias`` (a follower) the ``attention_mask`` its layer hands it, which then follows the tokens held
    and is added to the scores' logits as the attention adds it.

    Traced in training mode with the config's implementation set to ``eager``, so that
    the modeling module's ``eager_attention_forward`` is what transformers' dispatcher
    returns; for the length of the trace that name records one leaf call (the way
    torch.fx wraps functions), which :class:`AttentionFunction` then serves at run time.
    """
    graph, leaf, children = _traced_attention(attention, model_name, positions, bias)
    output = next(node for node in graph.nodes if node.op == "output")
    followed = (leaf.args[3],) if bias is not None else ()
    output.args = ((output.args[0], (leaf.args[0], leaf.args[1], leaf.kwargs.get("scaling"), None, *followed)),)
    return _attention_module(children, graph, attention, "Scored")


def bias_following_transformers_attention(attention: nn.Module, follower: nn.Module, model_name: str,
                                          positions: Collection[str] = ()) -> fx.GraphModule:
    """``attention`` computing as before, but on the ``attention_mask`` its layer hands it (a bias over the full
    sequence) put through ``follower`` first; it also takes (and ignores, as the attention does) what the
    layer passes on in ``**kwargs``."""
    graph, _, children = _traced_attention(attention, model_name, positions, follower)
    last_input = [node for node in graph.nodes if node.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        graph.placeholder("**kwargs")
    return _attention_module(children, graph, attention, "BiasFollowing")


class TransformersFamily(ModelFamily):
    """ViTs of Hugging Face transformers (see the module docstring)."""

    name = "transformers"
    library = "transformers"
    key_weighting = False
    attention_name = "attention"

    def _model_type(self, model: nn.Module) -> str:
        return str(getattr(getattr(model, "config", None), "model_type", ""))

    def model_name(self, model: nn.Module) -> str:
        kind = self._model_type(model)
        return f"{kind} ({type(model).__name__})" if kind else type(model).__name__

    def _base(self, model: nn.Module) -> nn.Module:
        """The encoder model inside a task model (``model.vit``, ``model.dinov2``, ...), or the
        model itself where it holds the embeddings (DINOv3's ``base_model`` is its encoder),
        after refusing the families that cannot be patched."""
        kind = self._model_type(model)
        if kind in REFUSED:
            raise UnsupportedModelError(self.model_name(model), REFUSED[kind])
        if getattr(model.config, "reshape_hidden_states", False) and hasattr(model, "out_features"):
            raise UnsupportedModelError(self.model_name(model), _BACKBONE)
        if kind not in SUPPORTED:
            raise UnsupportedModelError(
                self.model_name(model), f"transformers model type {kind!r} is not a family evit_patch knows "
                f"(supported: {', '.join(SUPPORTED)})")
        return model if isinstance(getattr(model, "embeddings", None), nn.Module) else getattr(model, "base_model", model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        base = self._base(model)
        for path in _BLOCK_PATHS:
            blocks = base
            for name in path.split("."):
                blocks = getattr(blocks, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return blocks
        raise UnsupportedModelError(self.model_name(model), f"{type(base).__name__} has no "
                                    f"{' / '.join(f'`{path}`' for path in _BLOCK_PATHS)} list of transformer layers")

    def sequence_inputs(self, model: nn.Module) -> dict[str, Optional[SequenceInput]]:
        """DINOv3's ``position_embeddings``, the ``(cos, sin)`` pair its model passes every layer; BEiT's
        relative position bias, which each layer hands its attention (:mod:`evit_patch.adapters.transformers_bias`)."""
        layers = self.blocks(model)
        if _ROTARY_INPUT in _layer_parameters(layers[0]):
            return {_ROTARY_INPUT: RotaryPair()}
        return relative_bias_inputs(self._base(model), layers, self.model_name(model), self.prefix_token_count(model))

    def prefix_token_count(self, model: nn.Module) -> int:
        """The class token, DeiT's distillation token and DINOv2's registers, as the
        embeddings put them before the patches."""
        embeddings = getattr(self._base(model), "embeddings", None)
        count = sum(getattr(embeddings, name, None) is not None for name in ("cls_token", "distillation_token"))
        registers = getattr(embeddings, "register_tokens", None)
        return count + (registers.shape[1] if registers is not None else 0)

    def score_mode(self, model: nn.Module) -> ScoreMode:
        return "class"

    def native_input_shape(self, model: nn.Module) -> Optional[tuple[int, int, int]]:
        config = model.config
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.num_channels), int(height), int(width)

    def patch_count(self, model: nn.Module) -> Optional[int]:
        patches = getattr(getattr(getattr(self._base(model), "embeddings", None), "patch_embeddings", None),
                          "num_patches", None)
        return patches if isinstance(patches, int) else None

    def input_module(self, model: nn.Module) -> nn.Module:
        """The embeddings, which every task model calls with the pixel values first."""
        embeddings = getattr(self._base(model), "embeddings", None)
        return embeddings if isinstance(embeddings, nn.Module) else model

    def rewrite_block(self, block: nn.Module, reorganizer: nn.Module, model_name: str,
                      positions: Mapping[str, Optional[nn.Module]] | None = None) -> nn.Module:
        """The layer rewritten from its own computation; it also takes (and, like the layer's
        attention, ignores) the output flags the encoder passes on (``output_hidden_states``,
        ...), which transformers' hooks read."""
        positions = dict(positions or {})
        bias = positions.pop(ATTENTION_BIAS, None)
        names = tuple(name for name, follower in positions.items() if follower is not None)
        kind = _RotaryLayerView if _ROTARY_INPUT in names else _LayerView if bias is None else bias_layer_view(block)
        patched = reorganizing_block(computation_view(block, kind), reorganizer, model_name, self.attention_name,
                                     partial(scored_transformers_attention, positions=names, bias=bias), positions,
                                     used_inputs=getattr(kind, "used_inputs", ()),
                                     attention_keywords=(BIAS_KEYWORD,) if bias is not None else ())
        last_input = [node for node in patched.graph.nodes if node.op == "placeholder"][-1]
        with patched.graph.inserting_after(last_input):
            patched.graph.placeholder("**kwargs")
        patched.recompile()
        return patched

    def bias_following_attention(self, attention: nn.Module, follower: nn.Module, model_name: str,
                                 positions: tuple[str, ...] = ()) -> nn.Module:
        return bias_following_transformers_attention(attention, follower, model_name, positions)

    def replacement_hooks(self, model: nn.Module, replacements: dict[int, nn.Module]) -> dict[int, list[Callable]]:
        """transformers records ``output_hidden_states`` with forward hooks on the layer class the
        model names in ``_can_record_outputs``, installed on the first request; a rewritten layer is
        not of that class, so its hidden state would be missing from the tuple. Each rewritten layer
        gets a hook that records as the layer it replaces (:class:`RecordsAsItsLayer`), inactive
        until a request comes; nothing else is installed now, so the model pickles as before."""
        recording = self._hidden_state_recording(model)
        if recording is None:
            return {}
        recorder = recording[1]
        return {index: [RecordsAsItsLayer(recorder.index, recorder.capture_initial_hidden_state)]
                for index in replacements if isinstance(self.blocks(model)[index], recorder.target_class)}

    def restore_originals(self, model: nn.Module, originals: dict[int, nn.Module]) -> None:
        """Layers that were out of the model when transformers installed its recording hooks (on
        the first request while patched) get theirs now, so the tuple is whole again."""
        from transformers.utils.output_capturing import install_output_capuring_hook

        recording = self._hidden_state_recording(model)
        if recording is None or not getattr(recording[0], "_output_capturing_hooks_installed", False):
            return
        recorder = recording[1]
        for layer in originals.values():
            if isinstance(layer, recorder.target_class) and not any(_is_recording_hook(hook) for hook in
                                                                     layer._forward_hooks.values()):
                install_output_capuring_hook(layer, "hidden_states", recorder.index, recorder.capture_initial_hidden_state)

    def _hidden_state_recording(self, model: nn.Module) -> Optional[tuple[nn.Module, Any]]:
        """The module whose forward records ``hidden_states`` (the one holding the layers: ViT's
        base model, DINOv2's encoder) and its recorder spec, or None."""
        from transformers.utils.output_capturing import OutputRecorder

        blocks = self.blocks(model)
        recording = next(module for module in model.modules() if any(child is blocks for child in module.children()))
        recorder = (getattr(recording, "_can_record_outputs", None) or {}).get("hidden_states")
        if recorder is None:
            return None
        if not isinstance(recorder, OutputRecorder):  # a bare class, as transformers reads it
            recorder = OutputRecorder(target_class=recorder, index=0)
        return (recording, recorder) if recorder.target_class is not None else None

    def output_tensor(self, output: Any) -> Tensor:
        for name in ("logits", "pooler_output", "last_hidden_state"):
            value = getattr(output, name, None)
            if value is not None:
                return value
        return output


class RecordsAsItsLayer:
    """transformers' ``hidden_states`` recording hook, for a rewritten layer: made by
    transformers' own installer on first use, and left out of pickles (transformers' hook is a
    local function, which pickle cannot take)."""

    def __init__(self, index: int, capture_initial_hidden_state: bool) -> None:
        self.index, self.capture_initial_hidden_state = index, capture_initial_hidden_state
        self.hook: Optional[Callable[..., None]] = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.hook is None:
            from transformers.utils.output_capturing import install_output_capuring_hook

            scratch = nn.Module()
            install_output_capuring_hook(scratch, "hidden_states", self.index, self.capture_initial_hidden_state)
            self.hook = next(iter(scratch._forward_hooks.values()))
        self.hook(module, args, output)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "hook": None}


def _layer_parameters(layer: nn.Module) -> Collection[str]:
    """The inputs of the layer's own forward (under transformers' wrappers)."""
    return inspect.signature(inspect.unwrap(type(layer).forward)).parameters


def _is_recording_hook(hook: Callable[..., Any]) -> bool:
    return isinstance(hook, RecordsAsItsLayer) or getattr(hook, "__qualname__", "").startswith("install_output_capuring_hook.")


TRANSFORMERS = TransformersFamily()

__all__ = ["TRANSFORMERS", "TransformersFamily", "AttentionFunction", "scored_transformers_attention"]
