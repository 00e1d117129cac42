"""What a model costs, and the keep rate that meets a cost.

MACs are counted by torch's own ``FlopCounterMode`` on one real forward (so every token
count a patched layer really runs on is in it), with the few formulas it lacks added so
that the count is fvcore's: layer and batch norms, and the attention matmuls of
``scaled_dot_product_attention`` on the CPU. fvcore itself (``engine="fvcore"``, the
``fvcore`` extra) is the cross-check; ``docs/macs.md`` compares the two. The keep rate
for a MAC budget (or for a higher input resolution at the same cost) is found by
bisection on that exact count of the model itself, not on a cost model of it: MACs grow
monotonically with the keep rate, in steps (token counts are ceilings).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from evit_patch.core.eval_mode import eval_mode
from evit_patch.core.lifecycle import detach, is_patched
from evit_patch.core.model_info import example_images, model_name, native_input_shape, takes_any_input_size
from evit_patch.core.token_patch import set_keep_rate
from evit_patch.extras import require
from evit_patch.reducers.evit import apply_evit

Engine = Literal["torch", "fvcore"]

_RESOLUTION = 1e-4  # keep-rate precision of the search; token counts move in steps of 1/n > 1e-3
aten = torch.ops.aten


def _attention_macs(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    """``B*H*Nq*Nk*(d_qk + d_v)``: the two matmuls of attention."""
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore's handle for ``aten::scaled_dot_product_attention``, which it skips."""
    return _attention_macs(*(list(i.type().sizes()) for i in inputs[:3]))


# FlopCounterMode's formulas get the shapes of an op's arguments and return FLOPs (2 per
# MAC); these return twice fvcore's MACs, so that half the total is fvcore's count.
Shape = Sequence[int]


def _cpu_attention_flops(query: Shape, key: Shape, value: Shape, *args: Any, **kwargs: Any) -> int:
    """The CPU kernel of ``scaled_dot_product_attention``, which FlopCounterMode skips
    (its own formulas cover the CUDA kernels)."""
    return 2 * _attention_macs(query, key, value)


def _layer_norm_flops(shape: Shape, normalized_shape: Any, weight: Shape | None = None, *args: Any, **kwargs: Any) -> int:
    """fvcore: 5 per element with an affine transform, 4 without."""
    return 2 * math.prod(shape) * (5 if weight is not None else 4)


def _batch_norm_flops(shape: Shape, weight: Shape | None = None, bias: Shape | None = None, running_mean: Any = None,
                      running_var: Any = None, training: bool = False, *args: Any, **kwargs: Any) -> int:
    """fvcore: as a layer norm in training; in eval a scale and shift (2), or a scale (1)."""
    if training:
        return _layer_norm_flops(shape, None, weight)
    return 2 * math.prod(shape) * (2 if weight is not None else 1)


def _no_training_batch_norm_flops(shape: Shape, weight: Shape | None = None, *args: Any, **kwargs: Any) -> int:
    return _batch_norm_flops(shape, weight)


_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten.native_layer_norm: _layer_norm_flops,
    aten.native_batch_norm: _batch_norm_flops,  # the CPU's batch norm
    aten.cudnn_batch_norm: _batch_norm_flops,  # the same arguments, on CUDA
    aten._native_batch_norm_legit_no_training: _no_training_batch_norm_flops,  # eval batch norm in exported graphs
}


def _torch_macs(model: nn.Module, image: Tensor) -> float:
    counter = FlopCounterMode(display=False, custom_mapping=_FORMULAS)
    with counter:
        model(image)
    return counter.get_total_flops() / 2


def _fvcore_macs(model: nn.Module, image: Tensor) -> float:
    analysis = require("fvcore.nn", "fvcore").FlopCountAnalysis(model, image)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return float(analysis.total())


def at_input_size(model: nn.Module, img_size: int | tuple[int, int]) -> nn.Module:
    """``model`` itself, or a resized copy when ``img_size`` differs from its native size."""
    shape = native_input_shape(model)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if shape is not None and tuple(shape[1:]) == size:
        return model
    if takes_any_input_size(model):
        return model
    if hasattr(model, "set_input_size"):
        resized = copy.deepcopy(model)
        resized.set_input_size(img_size=size)
        return resized
    raise ValueError(
        f"{model_name(model)} is built for {shape and shape[1:]} px and cannot be resized to {size}; "
        "create it with img_size=... or dynamic_img_size=True"
    )


def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None, *, engine: Engine = "torch") -> float:
    """Multiply-accumulates of one image through ``model`` (batch 1), as fvcore counts
    them plus the attention matmuls of ``scaled_dot_product_attention``.

    For a patched model this is the cost of the token counts its layers really run on.
    ``img_size`` defaults to the model's native input size. ``engine="fvcore"`` counts
    with fvcore itself (``pip install "evit_patch[fvcore]"``), the cross-check.
    """
    if engine not in ("torch", "fvcore"):
        raise ValueError(f"engine must be 'torch' or 'fvcore', got {engine!r}")
    if any(tensor.is_meta for tensor in itertools.chain(model.parameters(), model.buffers())):
        raise ValueError(f"count_macs: {model_name(model)} is on the meta device (its tensors hold no data, so it "
                         "cannot run); call model.to_empty(device='cpu') first: MACs do not depend on the values")
    shape = native_input_shape(model)
    if shape is None:
        raise ValueError(f"cannot tell the input size of {model_name(model)}; pass img_size")
    if img_size is None:
        img_size = shape[1:]
    measured = at_input_size(model, img_size)
    image = example_images(measured, 1, img_size)
    with torch.no_grad(), eval_mode(measured):
        return (_torch_macs if engine == "torch" else _fvcore_macs)(measured, image)


def largest_within(cost_at: Callable[[float], float], budget: float, low: float, high: float,
                   resolution: float) -> float:
    """The largest setting in ``[low, high]``, to ``resolution``, whose cost is at most
    ``budget``, for a cost that grows with the setting; ``low`` must fit."""
    while high - low > resolution:
        middle = (low + high) / 2
        low, high = (middle, high) if cost_at(middle) <= budget else (low, middle)
    return low


def _unpatched_copy(model: nn.Module, img_size: int | tuple[int, int] | None) -> nn.Module:
    """A copy of ``model`` without EViT, resized when ``img_size`` asks for it."""
    work = copy.deepcopy(model)
    if is_patched(work):
        detach(work)
    return work if img_size is None else at_input_size(work, img_size)


def keep_rate_for_budget(model: nn.Module, target_macs: float, layers: Sequence[int],
                         img_size: int | tuple[int, int] | None = None, *, fuse: bool = True) -> float:
    """The largest keep rate at which EViT on ``layers`` costs at most ``target_macs``.

    ``model`` is not changed (a copy is measured). ``img_size`` defaults to the model's
    native size. Raises ``ValueError`` when even keeping one token per layer costs more.
    """
    if not target_macs > 0:
        raise ValueError(f"target_macs must be a positive number of multiply-accumulates, got {target_macs!r}")
    work = apply_evit(_unpatched_copy(model, img_size), layers, 1.0, fuse=fuse)

    def macs_at(rate: float) -> float:
        set_keep_rate(work, rate)
        return count_macs(work)

    if macs_at(1.0) <= target_macs:
        return 1.0
    cheapest = macs_at(_RESOLUTION)
    if cheapest > target_macs:
        raise ValueError(
            f"no keep rate reaches {target_macs / 1e9:.3f} GMACs on layers {list(layers)}: even keep "
            f"{_RESOLUTION} costs {cheapest / 1e9:.3f} GMACs; reorganize earlier layers or lower the resolution"
        )
    return largest_within(macs_at, target_macs, _RESOLUTION, 1.0, _RESOLUTION)


def keep_rate_for_resolution(model: nn.Module, img_size: int | tuple[int, int], layers: Sequence[int],
                             *, fuse: bool = True) -> float:
    """The largest keep rate at which ``model`` at ``img_size`` with EViT on ``layers``
    costs no more than the unpatched model at its native resolution (the paper's
    "higher resolution at the same cost")."""
    native = count_macs(_unpatched_copy(model, None))
    return keep_rate_for_budget(model, native, layers, img_size, fuse=fuse)
