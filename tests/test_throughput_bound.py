"""The benchmark's token-count bound runs exactly EViT's token counts, by cutting the
sequence, so the gap between the two is EViT's own cost and nothing else."""

import copy

import timm
import torch
from benchmark_scripts import load_benchmark

import evit_patch


def block_lengths(model: torch.nn.Module, images: torch.Tensor) -> list[int]:
    lengths: list[int] = []
    hooks = [block.register_forward_hook(lambda _, __, out: lengths.append(out.shape[1])) for block in model.blocks]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return lengths


def test_bound_runs_evit_token_counts_by_keeping_the_first_tokens() -> None:
    throughput = load_benchmark("throughput")
    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=5, num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    layers, rate = [1, 2, 3], 0.55
    evit = evit_patch.apply_evit(copy.deepcopy(base), layers, rate)
    bound = evit_patch.apply_token_reducer(copy.deepcopy(base), layers, rate, throughput.TokenCountBound())
    counts = [65]  # 64 patches + the class token, then 1 + ceil(0.55 n) + 1 after each layer
    for _ in layers:
        counts.append(1 + -(-55 * (counts[-1] - 1) // 100) + 1)
    counts.append(counts[-1])
    assert block_lengths(evit, images) == counts == block_lengths(bound, images)

    seen: list[torch.Tensor] = []
    base.blocks[1].norm2.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0]))
    bound.blocks[1].norm2.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0]))
    with torch.no_grad():
        base(images)
        bound(images)
    full, cut = seen
    assert torch.equal(cut, full[:, : counts[1]])  # the first tokens, as they lie
