"""Export a patched model for deployment at a fixed batch and input size.

Token counts after each reorganization layer follow from the input size and the keep
rate, so for a fixed input shape the exported graph is static: top-k, gather and the
fusion matmul export like any other op.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from evit_patch.core.model_info import example_images
from evit_patch.extras import require


def export_program(model: nn.Module, batch_size: int = 1,
                   img_size: int | tuple[int, int] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of the model in eval mode at a fixed input shape."""
    model.eval()
    return torch.export.export(model, (example_images(model, batch_size, img_size),))


def export_onnx(model: nn.Module, path: str | Path, batch_size: int = 1,
                img_size: int | tuple[int, int] | None = None) -> Path:
    """ONNX file of the model at a fixed input shape (needs ``pip install "evit_patch[export]"``)."""
    for module in ("onnx", "onnxscript"):  # torch.onnx's dynamo exporter imports both
        require(module, "export")
    model.eval()
    path = Path(path)
    torch.onnx.export(model, (example_images(model, batch_size, img_size),), str(path), dynamo=True,
                      input_names=["images"], output_names=["logits"])
    return path
