"""Dense features of a reduced model: the full patch grid at the entry points that return it.

Classification stays on the short sequence (``forward``, ``forward_features``). Where a
caller asks for patch features, the grid comes back through the recorded token maps
(:mod:`evit_patch.core.restoration`):

- :func:`dense_outputs`, a context in which hooks on the blocks from the first reduction
  layer on hand each block's output out restored to the full grid, and swap the next
  block's input back to the reduced sequence, so the blocks still run short. Whatever
  reads the blocks' outputs (timm's norm and ``forward_features``, transformers'
  ``last_hidden_state``, open_clip's tokens) then sees the full grid.
- timm's ``forward_intermediates`` on a patched model (installed on the instance while the
  patch is on) is timm's own code run inside that context: its prefix split, ``norm`` and
  NCHW reshape work unchanged, with exactly the unpatched shapes; its final features stay
  ``forward_features``'s (the reduced sequence, normed), as timm's contract wants.
- :func:`restore_tokens` turns a reduced output of the last forward into the full
  sequence afterwards, from the token maps alone.

The fill of patches that are not their own token any more is the model's
``restoration`` setting (:func:`set_restoration`; default ``carry``, chosen in docs/dense.md).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Iterable, Iterator, Optional

from torch import Tensor, nn

from evit_patch.core.lifecycle import STATE_ATTRIBUTE
from evit_patch.core.model_info import model_name, transformer_blocks
from evit_patch.core.restoration import NEEDS_ENTERING_GRID, Fill, PatchPlaces, check_fill, places_of, restore_sequence

DEFAULT_FILL: Fill = "carry"
"""The default fill; docs/dense.md compares the fills."""


def _state(model: nn.Module) -> Any:
    """The reduction state of ``model`` (a ReductionState; read by duck typing, so this module
    sits below the reorganizer that installs it)."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None or not hasattr(state, "records"):
        raise ValueError(f"{model_name(model)} is not patched with a token reducer; dense restoration reads the "
                         "token maps a reducer records (apply_evit / apply_token_reducer first)")
    return state


def set_restoration(model: nn.Module, fill: Fill) -> None:
    """How ``forward_intermediates`` and :func:`restore_tokens` fill the patches that are not
    their own token any more: ``source``, ``carry``, ``nearest``, ``similar`` or ``zeros``."""
    _state(model).restoration = check_fill(fill)


def grid_size_of(model: nn.Module, images: Optional[Tensor] = None) -> Optional[tuple[int, int]]:
    """``(rows, cols)`` of the patch grid (of ``images`` when given), or None when unknown."""
    patch_embed = getattr(model, "patch_embed", None)
    if images is not None and hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.dynamic_feat_size(images.shape[-2:]))
    grid = getattr(patch_embed, "grid_size", None) or getattr(model, "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def restore_tokens(model: nn.Module, tokens: Tensor, fill: Fill = "source",
                   grid_size: Optional[tuple[int, int]] = None) -> Tensor:
    """The reduced tokens ``(B, P + m, C)`` of the last forward of ``model`` as the full
    sequence ``(B, P + N, C)``: prefix tokens first, then one feature per patch in grid order.

    ``tokens`` is what the last block (or a per-token map of it: a norm, a projection)
    produced, e.g. ``model.forward_features(x)``. This needs nothing but the token maps, so
    it offers the fills that need no other block's output (``source``, ``nearest``,
    ``zeros``); ``carry`` (the default of :func:`dense_outputs` and ``forward_intermediates``)
    and ``similar`` need the sequence entering each reduction layer and are refused here
    with the call that gives it.
    """
    state = _state(model)
    if check_fill(fill) in NEEDS_ENTERING_GRID:
        raise ValueError(f"fill {fill!r} needs the sequence entering each reduction layer: run the forward inside "
                         "`with evit_patch.dense_outputs(model):` (or call model.forward_intermediates), "
                         "or restore_tokens with fill 'source', 'nearest' or 'zeros'")
    first = next((record for record in state.records if record is not None), None)
    if first is None:
        raise RuntimeError("no token record yet: run a forward pass through the patched model first")
    places = places_of(state.records, first.batch, first.incoming, first.device)
    prefix = state.num_prefix_tokens
    expected = prefix + places.token_is_mixed.shape[1]
    if tokens.dim() != 3 or tokens.shape[0] != first.batch or tokens.shape[1] != expected:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} are not the last forward's output: expected "
                         f"({first.batch}, {expected}, C) ({prefix} prefix + {expected - prefix} image tokens)")
    return restore_sequence(tokens, places, prefix, fill, grid_size=grid_size or grid_size_of(model))


class _GridHooks:
    """Hooks on the blocks from the first reduction layer on: the output of each block in
    ``restored`` goes out on the full grid, and the next block's input comes back reduced.

    Only the token maps of the reduction layers the running forward has passed (those before
    the hooked block in the chain) are composed, one step per layer and only when a block is
    restored, so a record left over from an earlier forward is never read, whichever entry
    point (or reset mechanism) runs the model, and a reduction block needs no hook of its own
    to be followed. Fills ``carry`` and ``similar`` keep the grid as it enters each reduction
    layer: the patches that stop being their own token there keep that feature."""

    def __init__(self, model: nn.Module, state: Any, grid_size: Optional[tuple[int, int]],
                 restored: Optional[Iterable[int]]) -> None:
        self.state, self.fill, self.grid_size = state, check_fill(state.restoration), grid_size
        blocks = transformer_blocks(model)
        first = state.layers[0]
        restored = {index for index in (range(len(blocks)) if restored is None else restored) if first <= index}
        # hooks only where there is work: the first reduction block (a new forward), blocks after a restored one
        # (input swapped back) and, for carry and similar, reduction blocks (the grid entering them)
        entering = {first} | {index + 1 for index in restored}
        if self.fill in NEEDS_ENTERING_GRID:
            entering |= set(state.layers)
        self.entering = [blocks[index] for index in sorted(entering) if index < len(blocks)]
        self.leaving = [blocks[index] for index in sorted(restored)]
        self.first = blocks[first]
        self.index = {id(block): index for index, block in enumerate(blocks)}
        self.reduces = {id(blocks[index]) for index in state.layers}
        self.places: Optional[PatchPlaces] = None  # after this forward's first `followed` reduction layers
        self.followed = 0
        self.previous: Optional[Tensor] = None  # carry, similar: the sequence as it entered the last reduction layer
        self.handed_out: Optional[tuple[Tensor, Tensor]] = None  # (restored, reduced) of the block before
        self.thread = threading.get_ident()  # hooks sit on shared blocks: other threads' forwards pass untouched

    def _follow(self, last_block: int) -> None:
        """Compose the maps of the reduction layers up to block ``last_block`` into ``places``."""
        layers = self.state.layers
        while self.followed < len(layers) and layers[self.followed] <= last_block:
            self.places = self.places.after(self.state.records[self.followed])
            self.followed += 1

    def _restore(self, tokens: Tensor) -> Tensor:
        return restore_sequence(tokens, self.places, self.state.num_prefix_tokens, self.fill,
                                previous=self.previous, grid_size=self.grid_size)

    def before(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[tuple[Any, Any]]:
        if threading.get_ident() != self.thread:
            return None
        tokens = args[0] if args else next(iter(kwargs.values()), None)
        swapped = None
        if block is self.first:  # a new forward enters the first reduction block
            prefix = self.state.num_prefix_tokens
            self.places = PatchPlaces.start(tokens.shape[0], tokens.shape[1] - prefix, tokens.device, prefix)
            self.previous, self.handed_out, self.followed = tokens, None, 0
            return None
        if self.handed_out is not None:
            restored, tokens = self.handed_out
            if (args[0] if args else next(iter(kwargs.values()))) is not restored:
                raise RuntimeError(f"{type(block).__name__} did not receive the output of the block before it; dense "
                                   "restoration follows a plain chain of blocks (as timm's, transformers' and "
                                   "open_clip's encoders run them)")
            swapped = ((tokens, *args[1:]), kwargs) if args else (args, {**kwargs, next(iter(kwargs)): tokens})
        if self.fill in NEEDS_ENTERING_GRID and id(block) in self.reduces:
            if self.handed_out is not None:  # the block before was restored: that is the grid entering this one
                self.previous = restored
            else:
                self._follow(self.index[id(block)] - 1)
                self.previous = self._restore(tokens)
        self.handed_out = None
        return swapped

    def after(self, block: nn.Module, args: tuple[Any, ...], output: Tensor) -> Optional[Tensor]:
        if threading.get_ident() != self.thread:
            return None
        self._follow(self.index[id(block)])
        restored = self._restore(output)
        self.handed_out = (restored, output)
        return restored

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = [block.register_forward_pre_hook(self.before, with_kwargs=True) for block in self.entering]
        # first among the blocks' output hooks, so that the library's own (transformers' hidden_states) see the grid
        handles += [block.register_forward_hook(self.after, prepend=True) for block in self.leaving]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def dense_outputs(model: nn.Module, grid_size: Optional[tuple[int, int]] = None,
                  blocks: Optional[Iterable[int]] = None) -> Iterator[None]:
    """Within this context every forward of ``model`` hands out full-grid block outputs: the
    sequence leaving each block (of ``blocks``, default all) from the first reduction layer
    on is restored to ``(B, P + N, C)`` (fill: :func:`set_restoration`) while the next block
    still runs on the reduced one. So whatever the model does after its blocks (a final
    norm, timm's ``forward_features``, transformers' ``last_hidden_state``, open_clip's
    ``output_tokens``) sees the full grid, and pooled outputs of the class token are
    unchanged. ``grid_size`` (rows, cols) is needed by fill ``nearest`` only, when the model
    does not tell its own.
    """
    state = _state(model)
    with _GridHooks(model, state, grid_size or grid_size_of(model), blocks).installed():
        yield


class _ReducedFinal:
    """The final features of ``forward_intermediates`` from the reduced sequence, as ``forward_features``
    computes them, where the last block run is also an intermediate (restored by :class:`_GridHooks`).

    From the moment that block has run, every module of the model outside its blocks (the final norm,
    CaiT's class-attention blocks) is handed the reduced sequence where it is given the restored one;
    with timm's ``norm=True`` the first call of ``model.norm`` on it is the intermediate's, which stays
    on the grid."""

    def __init__(self, model: nn.Module, grid: _GridHooks, last_block: nn.Module, intermediate_norms: int) -> None:
        inside = {id(module) for block in transformer_blocks(model) for module in block.modules()}
        self.outside = [module for module in model.modules() if module is not model and id(module) not in inside]
        self.grid, self.last_block, self.norm = grid, last_block, getattr(model, "norm", None)
        self.intermediate_norms = intermediate_norms
        self.pair: Optional[tuple[Tensor, Tensor]] = None  # (restored, reduced) of the last block, once it has run

    def _last_block_ran(self, block: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if threading.get_ident() == self.grid.thread:  # another thread's forward passes the shared block too
            self.pair = self.grid.handed_out

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[tuple[Any, Any]]:
        if self.pair is None or not any(value is self.pair[0] for value in (*args, *kwargs.values())):
            return None
        if module is self.norm and self.intermediate_norms:
            self.intermediate_norms -= 1
            return None
        restored, reduced = self.pair
        return (tuple(reduced if value is restored else value for value in args),
                {key: reduced if value is restored else value for key, value in kwargs.items()})

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = [self.last_block.register_forward_hook(self._last_block_ran)]
        handles += [module.register_forward_pre_hook(self.before, with_kwargs=True) for module in self.outside]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def restoring_forward_intermediates(model: nn.Module, x: Tensor, indices: Optional[int | list[int]] = None,
                                    *args: Any, **kwargs: Any) -> Any:
    """timm's ``forward_intermediates`` of the model's class, with every intermediate restored to the full
    patch grid (exactly the unpatched shapes), and the final features those of ``forward_features``:
    the reduced sequence, normed, as timm's contract wants. Only the blocks handed out are restored
    (timm's own choice of them from ``indices``)."""
    from timm.models._features import feature_take_indices  # timm's own reading of `indices`

    state = _state(model)  # a clear error on an unpatched model; the forward's own reset is the patch embedding's hook
    if getattr(model, "grad_checkpointing", False) and model.training:
        raise ValueError(f"{model_name(model)}: dense restoration hooks the blocks, which gradient checkpointing "
                         "recomputes; call model.set_grad_checkpointing(False) first")
    blocks = transformer_blocks(model)
    taken, last = feature_take_indices(len(blocks), indices)
    call = inspect.signature(type(model).forward_intermediates).bind(model, x, indices, *args, **kwargs)
    call.apply_defaults()
    last_run = last if call.arguments.get("stop_early") else len(blocks) - 1
    grid = _GridHooks(model, state, grid_size_of(model, x), taken)
    final = _ReducedFinal(model, grid, blocks[last_run], int(bool(call.arguments.get("norm"))))
    with grid.installed(), final.installed() if last_run in taken else contextlib.nullcontext():
        return type(model).forward_intermediates(model, x, indices, *args, **kwargs)


def install_dense_entry_points(model: nn.Module) -> None:
    """Route ``model.forward_intermediates`` (when its class has one) through the restoration (a partial of
    a module-level function, not a bound method: the model pickles)."""
    if callable(getattr(type(model), "forward_intermediates", None)):
        model.forward_intermediates = functools.partial(restoring_forward_intermediates, model)


def refusing_forward_intermediates(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """timm's ``forward_intermediates`` where the patch keeps the sequence whole (DynamicViT in
    training masks tokens); a clear error where it drops tokens without a map to restore."""
    if model.training:
        return type(model).forward_intermediates(model, *args, **kwargs)
    state = getattr(model, STATE_ATTRIBUTE)
    raise ValueError(f"{model_name(model)} is patched with {state.method}, whose evaluation drops tokens without "
                     "the token maps dense restoration reads; use a token reducer (apply_evit, "
                     f"apply_token_reducer) for dense features, or call {state.removal} first")


def install_dense_refusal(model: nn.Module) -> None:
    """Route ``model.forward_intermediates`` (when its class has one) to a clear refusal in eval."""
    if callable(getattr(type(model), "forward_intermediates", None)):
        model.forward_intermediates = functools.partial(refusing_forward_intermediates, model)


def uninstall_dense_entry_points(model: nn.Module) -> None:
    model.__dict__.pop("forward_intermediates", None)
