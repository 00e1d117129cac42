"""Published LV-ViT checkpoints (original key names) load from a local file, or fail clearly."""

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from evit_patch.models import load_lvvit_checkpoint
from evit_patch.train.checkpoint import CheckpointError

SMALL = dict(img_size=32, patch_size=4, num_classes=5, embed_dim=24, depth=4, num_heads=2, stem_chans=8)
STEM = re.compile(r"^patch_embed\.stem\.(\d)\.(conv|bn)\.")


def _small(seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("lvvit_s", **{**SMALL, **overrides}).eval()
    for value in model.state_dict().values():  # every tensor, BatchNorm statistics included, made distinct
        if value.is_floating_point():
            value.uniform_(0.5, 1.5)
    return model


def _published_names(state: dict) -> dict:
    """This model's state_dict under the names of the published TokenLabeling checkpoints."""
    def rename(key: str) -> str:
        return STEM.sub(lambda m: f"patch_embed.{m.group(2)}{int(m.group(1)) + 1}.", key)
    return {rename(key): value for key, value in state.items()}


def _write(state: dict, path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


def _assert_same(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), original(images), rtol=0, atol=0)


def test_published_names_are_the_original_ones() -> None:
    names = _published_names(_small(0).state_dict())
    assert {"patch_embed.conv1.weight", "patch_embed.bn3.running_var", "patch_embed.proj.weight", "cls_token",
            "pos_embed", "blocks.3.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "aux_head.bias"} <= set(names)
    assert not any(".stem." in name for name in names)


@pytest.mark.parametrize("suffix", [".pth.tar", ".safetensors"])
def test_published_checkpoint_round_trips_through_timm(tmp_path, suffix: str) -> None:
    original = _small(0)
    path = _write(_published_names(original.state_dict()), tmp_path / f"lvvit{suffix}")
    loaded = timm.create_model("lvvit_s", pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=5),
                               **SMALL).eval()
    _assert_same(loaded, original)


def test_wrapped_checkpoint_without_batchnorm_counters_loads(tmp_path) -> None:
    original = _small(0)
    state = {k: v for k, v in _published_names(original.state_dict()).items() if "num_batches_tracked" not in k}
    path = _write({"state_dict": state, "epoch": 299}, tmp_path / "lvvit_s.pth.tar")
    loaded = load_lvvit_checkpoint(_small(1), path)
    _assert_same(loaded, original)


def test_this_models_own_names_load_too(tmp_path) -> None:
    original = _small(0)
    path = _write(original.state_dict(), tmp_path / "own.pth")
    _assert_same(load_lvvit_checkpoint(_small(1), path), original)


def test_mismatch_names_every_missing_and_unexpected_key(tmp_path) -> None:
    shallow = _published_names(_small(0, depth=3).state_dict())
    shallow["blocks.0.attn.qkv.bias"] = torch.zeros(72)
    path = _write(shallow, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as error:
        timm.create_model("lvvit_s", pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=5), **SMALL)
    message = str(error.value)
    missing, unexpected = message.split("unexpected keys:")
    for key in ("blocks.3.norm1.weight", "blocks.3.attn.qkv.weight", "blocks.3.mlp.fc2.bias"):
        assert key in missing
    assert "blocks.0.attn.qkv.bias" in unexpected
    assert "blocks.2." not in message
    with pytest.raises(CheckpointError, match="blocks.3.attn.proj.weight"):
        load_lvvit_checkpoint(_small(1), path)


def test_position_embedding_is_resampled_to_another_resolution(tmp_path) -> None:
    original = _small(0)
    path = _write(_published_names(original.state_dict()), tmp_path / "lvvit.pth")
    larger = load_lvvit_checkpoint(_small(1, img_size=48), path)
    assert larger.pos_embed.shape == (1, 1 + 12 * 12, 24)
    torch.testing.assert_close(larger.pos_embed[:, 0], original.pos_embed[:, 0])
    torch.testing.assert_close(larger.blocks[2].mlp.fc1.weight, original.blocks[2].mlp.fc1.weight)


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="nowhere.pth"):
        load_lvvit_checkpoint(_small(0), tmp_path / "nowhere.pth")
