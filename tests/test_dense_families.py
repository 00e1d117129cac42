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


def _transformers_model(registers: int) -> torch.nn.Module:
    """DINOv2 with ``registers`` register tokens, or a ViT without any."""
    torch.manual_seed(0)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=registers)
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.ViTModel(transformers.ViTConfig(**SMALL, intermediate_size=96)).eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_transformers_last_hidden_state_on_the_full_grid(registers: int) -> None:
    base = _transformers_model(registers)
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


@pytest.mark.parametrize("registers", [0, 4])
def test_transformers_hidden_states_on_the_full_grid(registers: int) -> None:
    """Inside dense_outputs every entry of ``hidden_states`` has the unpatched shape: the restoring
    hooks run before transformers' recording hooks. Entries up to the first reorganizing layer's
    input are the unpatched ones, the prefix rows those of the reduced forward, and the last entry
    is what the model's final norm turns into the restored ``last_hidden_state``."""
    base = _transformers_model(registers)
    x = _images()
    expected = base(x, output_hidden_states=True).hidden_states
    model = evit_patch.apply_evit(copy.deepcopy(base), LAYERS, 0.5)
    reduced = model(x, output_hidden_states=True).hidden_states
    with evit_patch.dense_outputs(model):
        dense = model(x, output_hidden_states=True)
    assert [state.shape for state in dense.hidden_states] == [state.shape for state in expected]
    assert reduced[-1].shape[1] < expected[-1].shape[1]
    for index in range(LAYERS[0] + 1):
        assert torch.equal(dense.hidden_states[index], expected[index])
    prefix = 1 + registers
    for restored, short in zip(dense.hidden_states[LAYERS[0] + 1:], reduced[LAYERS[0] + 1:]):
        assert torch.equal(restored[:, :prefix], short[:, :prefix])
    torch.testing.assert_close(model.layernorm(dense.hidden_states[-1]), dense.last_hidden_state)


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
