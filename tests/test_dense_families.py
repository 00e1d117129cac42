"""Dense restoration on transformers and open_clip ViTs: their patch outputs on the full grid."""

from __future__ import annotations

import copy

import pytest
import torch

import evit_patch

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

SMALL = {"hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 3, "image_size": 32, "patch_size": 8}
LAYERS = [1, 2]


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("registers", [0, 4])
def test_transformers_last_hidden_state_on_the_full_grid(registers: int) -> None:
    torch.manual_seed(0)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=registers)
        base = transformers.Dinov2WithRegistersModel(config).eval()
    else:
        base = transformers.ViTModel(transformers.ViTConfig(**SMALL, intermediate_size=96)).eval()
    x = _images()
    expected = base(x)
    model = evit_patch.apply_evit(copy.deepcopy(base), LAYERS, 0.5)
    assert model(x).last_hidden_state.shape[1] < expected.last_hidden_state.shape[1]
    with evit_patch.dense_outputs(model, grid_size=(4, 4)):
        dense = model(x)
    assert dense.last_hidden_state.shape == expected.last_hidden_state.shape
    torch.testing.assert_close(dense.pooler_output, model(x).pooler_output)
    restored = evit_patch.restore_tokens(model, model(x).last_hidden_state, "nearest", grid_size=(4, 4))
    assert restored.shape == expected.last_hidden_state.shape


def test_open_clip_tokens_on_the_full_grid() -> None:
    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(layers=4, width=48, head_width=16, mlp_ratio=2.0, patch_size=8,
                                           image_size=32)
    base = open_clip.model._build_vision_tower(16, vision).eval()
    base.output_tokens = True
    x = _images()
    pooled, tokens = base(x)
    model = evit_patch.apply_evit(copy.deepcopy(base), LAYERS, 0.5)
    with evit_patch.dense_outputs(model):
        dense_pooled, dense_tokens = model(x)
    assert dense_tokens.shape == tokens.shape
    torch.testing.assert_close(dense_pooled, model(x)[0])
