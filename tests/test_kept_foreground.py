"""The foreground share of kept tokens counts exactly the kept patches that cover the object."""


import timm
import torch
from benchmark_scripts import load_benchmark

import evit_patch
from evit_patch.train.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def test_shares_match_an_independent_count_from_the_kept_indices() -> None:
    script = load_benchmark("kept_foreground")
    torch.manual_seed(0)
    model = evit_patch.apply_evit(timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1,
                                                    embed_dim=32, depth=3, num_heads=2, num_classes=3).eval(), [1], 0.5)
    raw = torch.zeros(6, 1, 16, 16)
    raw[:, :, :, :8] = 1.0  # left half of every image is bright: patch columns 0 and 1
    raw[:3, :, :4, 8:] = 0.05  # a dim strip: below the threshold
    images = (raw - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0] + 0.01 * torch.randn(6, 1, 16, 16)
    [row] = script.kept_foreground(model, images.split(4), threshold=0.1)

    foreground = torch.tensor([column < 2 for _ in range(4) for column in range(4)])  # row-major 4x4 patches
    with torch.no_grad():
        model(images)
    [layer] = evit_patch.kept_tokens(model)
    kept = layer.kept_index  # (6, 8): original patch positions
    assert kept.shape == (6, 8)
    assert row["kept_per_image"] == 8
    assert row["foreground_of_kept"] == foreground[kept].sum().item() / 48
    assert row["foreground_of_fused"] == (8 - foreground[kept].sum(dim=1)).sum().item() / 48
    assert row["foreground_of_all"] == 0.5
