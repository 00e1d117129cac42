"""A patched model exports with torch.export and ONNX and computes the same outputs."""

import numpy as np
import pytest
import timm
import torch

import evit_patch
from evit_patch.core.model_info import example_images
from evit_patch.tools.export import export_onnx, export_program


@pytest.fixture()
def patched():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4).eval()
    return evit_patch.apply_evit(model, [1, 2], 0.5)


def test_torch_export_round_trip(patched, tmp_path) -> None:
    program = export_program(patched, batch_size=2)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(images), patched(images))
        assert example_images(patched, 2).shape == images.shape


def test_onnx_round_trip(patched, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_onnx(patched, tmp_path / "model.onnx", batch_size=2)
    session = onnxruntime.InferenceSession(str(path))
    images = torch.randn(2, 3, 64, 64)
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, patched(images).numpy(), rtol=1e-4, atol=1e-5)
