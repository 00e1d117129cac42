"""Export a patched model for deployment at a fixed batch and input size.

Token counts after each reorganization layer follow from the input size and the keep
rate, so for a fixed input shape the exported graph is static: top-k, gather and the
fusion matmul export like any other op.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from evit_patch.inspection import model_name, native_input_shape


def example_input(model: nn.Module, batch_size: int = 1, img_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """A zero image batch of the shape the model is exported for."""
    shape = native_input_shape(model)
    if shape is None:
        raise ValueError(f"cannot tell the input shape of {model_name(model)}; pass img_size")
    height, width = shape[1:] if img_size is None else (
        (img_size, img_size) if isinstance(img_size, int) else img_size
    )
    parameter = next(model.parameters())
    return torch.zeros(batch_size, shape[0], height, width, device=parameter.device, dtype=parameter.dtype)


def export_program(model: nn.Module, batch_size: int = 1,
                   img_size: int | tuple[int, int] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of the model in eval mode at a fixed input shape."""
    model.eval()
    return torch.export.export(model, (example_input(model, batch_size, img_size),))


def export_onnx(model: nn.Module, path: str | Path, batch_size: int = 1,
                img_size: int | tuple[int, int] | None = None) -> Path:
    """ONNX file of the model at a fixed input shape (needs the ``onnx`` and ``onnxscript`` packages)."""
    model.eval()
    path = Path(path)
    torch.onnx.export(model, (example_input(model, batch_size, img_size),), str(path), dynamo=True,
                      input_names=["images"], output_names=["logits"])
    return path
