"""Multiply-accumulate counts with fvcore, fused attention included."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from evit_patch.inspection import model_name, native_input_shape
from evit_patch.modes import eval_mode


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``B*H*Nq*Nk*(d_qk + d_v)``: the two matmuls of attention, which fvcore skips."""
    query, key, value = (list(i.type().sizes()) for i in inputs[:3])
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def at_input_size(model: nn.Module, img_size: int | tuple[int, int]) -> nn.Module:
    """``model`` itself, or a resized copy when ``img_size`` differs from its native size."""
    shape = native_input_shape(model)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if shape is not None and tuple(shape[1:]) == size:
        return model
    if getattr(model, "dynamic_img_size", False):
        return model
    if hasattr(model, "set_input_size"):
        resized = copy.deepcopy(model)
        resized.set_input_size(img_size=size)
        return resized
    raise ValueError(
        f"{model_name(model)} is built for {shape and shape[1:]} px and cannot be resized to {size}; "
        "create it with img_size=... or dynamic_img_size=True"
    )


def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> float:
    """Multiply-accumulates of one image through ``model`` (batch 1), as fvcore counts
    them plus the attention matmuls of ``scaled_dot_product_attention``.

    For a patched model this is the cost of the token counts its layers really run on.
    ``img_size`` defaults to the model's native input size.
    """
    from fvcore.nn import FlopCountAnalysis  # imported here: fvcore's import warns about torch.jit

    shape = native_input_shape(model)
    if shape is None:
        raise ValueError(f"cannot tell the input size of {model_name(model)}; pass img_size")
    if img_size is None:
        img_size = shape[1:]
    measured = at_input_size(model, img_size)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    parameter = next(measured.parameters())
    image = torch.zeros(1, shape[0], height, width, device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad(), eval_mode(measured):
        analysis = FlopCountAnalysis(measured, image)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return float(analysis.total())
