"""kept_tokens: which input patches each layer kept, fused or dropped."""

import pytest
import timm
import torch

import evit_patch
from evit_patch import DROPPED, FUSED, KEPT


def _simulate(kept_per_layer: list[list[int]], num_patches: int, fuse: bool) -> list[list[int]]:
    """Follow each patch through the layers with Python lists: the expected statuses."""
    tokens = [({p}, False) for p in range(num_patches)]  # (patches, is a fused token)
    statuses = []
    for kept in kept_per_layer:
        rest = [t for i, t in enumerate(tokens) if i not in set(kept)]
        tokens = [tokens[i] for i in kept]
        if fuse and rest:
            tokens.append((set().union(*(patches for patches, _ in rest)), True))
        status = [DROPPED] * num_patches
        for patches, fused in tokens:
            for p in patches:
                status[p] = FUSED if fused else KEPT
        statuses.append(status)
    return statuses


@pytest.mark.parametrize("fuse", [True, False])
def test_statuses_follow_the_tokens(fuse: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=96, depth=5).eval()
    evit_patch.apply_evit(model, [1, 2, 3], 0.6, fuse=fuse)
    with pytest.raises(RuntimeError, match="forward"):
        evit_patch.kept_tokens(model)
    model(torch.randn(3, 3, 96, 96))
    layers = evit_patch.kept_tokens(model)
    assert [layer.block_index for layer in layers] == [1, 2, 3]
    for b in range(3):
        expected = _simulate([layer.kept_index[b].tolist() for layer in layers], 36, fuse)
        for layer, status in zip(layers, expected):
            assert layer.status[b].tolist() == status
            alive = layer.token_of_patch[b] >= 0
            assert alive.tolist() == [s != DROPPED for s in status]
    first = layers[0]
    assert (first.status == KEPT).sum(1).tolist() == [22] * 3  # ceil(0.6 * 36)
    kept_patch = first.kept_index[0, 5]
    assert first.token_of_patch[0, kept_patch] == 5
