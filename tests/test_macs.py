"""count_macs against the published EViT table, an analytic count and fvcore."""

import pytest
import timm
from reference_evit import kept_count

import evit_patch
from evit_patch.dynamicvit import apply_dynamicvit
from evit_patch.reducers import TrainingFreeEvit

PUBLISHED_DEIT_S = {1.0: 4.6, 0.9: 4.0, 0.8: 3.5, 0.7: 3.0, 0.6: 2.6, 0.5: 2.3}


@pytest.fixture(scope="module")
def deit_small():
    return timm.create_model("deit_small_patch16_224")


def test_unpatched_deit_small_counts_fused_attention(deit_small) -> None:
    assert evit_patch.count_macs(deit_small) / 1e9 == pytest.approx(4.608, abs=0.005)


@pytest.mark.parametrize("keep_rate", list(PUBLISHED_DEIT_S))
def test_deit_small_matches_the_published_table(deit_small, keep_rate) -> None:
    evit_patch.apply_evit(deit_small, [3, 6, 9], keep_rate)
    try:
        assert evit_patch.count_macs(deit_small) / 1e9 == pytest.approx(PUBLISHED_DEIT_S[keep_rate], abs=0.1)
    finally:
        evit_patch.remove_evit(deit_small)


def test_deit_base_at_keep_0_7() -> None:
    model = evit_patch.apply_evit(timm.create_model("deit_base_patch16_224"), [3, 6, 9], 0.7)
    assert evit_patch.count_macs(model) / 1e9 == pytest.approx(11.6, abs=0.1)


def analytic_vit_macs(tokens_in: list[int], tokens_out: list[int], dim: int, hidden: int,
                      patches: int, patch_macs: int, classes: int) -> int:
    """Linear layers, attention matmuls and layer norms (5 per element, as fvcore counts)
    of each block, attention on its input tokens and MLP on its output tokens."""
    total = patches * patch_macs + dim * classes + 5 * tokens_out[-1] * dim
    for n_attn, n_mlp in zip(tokens_in, tokens_out):
        total += n_attn * dim * 4 * dim + 2 * n_attn * n_attn * dim + 5 * n_attn * dim
        total += 2 * n_mlp * dim * hidden + 5 * n_mlp * dim
    return total


@pytest.mark.parametrize("keep_rate, fuse", [(1.0, True), (0.7, True), (0.5, False)])
def test_patched_count_is_the_cost_of_the_tokens_really_run(deit_small, keep_rate, fuse) -> None:
    layers, counts, n = [3, 6, 9], [], 196
    for index in range(12):
        if index in layers:
            keep = kept_count(n, keep_rate)
            n = keep + (1 if fuse and keep < n else 0)
        counts.append(n + 1)
    tokens_in = [197] + counts[:-1]
    expected = analytic_vit_macs(tokens_in, counts, 384, 1536, 196, 16 * 16 * 3 * 384, 1000)
    evit_patch.apply_evit(deit_small, layers, keep_rate, fuse=fuse)
    try:
        # the class-attention row and the fusion add O(N*C) per layer: far below 0.1%
        assert evit_patch.count_macs(deit_small) == pytest.approx(expected, rel=1e-3)
    finally:
        evit_patch.remove_evit(deit_small)


def test_count_at_another_resolution_leaves_the_model_alone(deit_small) -> None:
    macs_272 = evit_patch.count_macs(deit_small, img_size=272)
    assert tuple(deit_small.patch_embed.img_size) == (224, 224)
    assert macs_272 / 1e9 == pytest.approx(evit_patch.count_macs(timm.create_model("deit_small_patch16_224", img_size=272)) / 1e9)


def pruned_tiny():
    from evit_patch.width_pruning import apply_pruned_shape

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2)
    return apply_pruned_shape(model, {"heads": [2, 1], "mlp_hidden": [300, 77]})


CROSS_CHECKED = {
    "deit_small keep 0.7": lambda: evit_patch.apply_evit(timm.create_model("deit_small_patch16_224"), [3, 6, 9], 0.7),
    "lvvit (conv stem, batch norm)": lambda: evit_patch.apply_evit(timm.create_model("lvvit_s", depth=4), [1, 2], 0.7),
    "distilled": lambda: evit_patch.apply_evit(timm.create_model("deit_tiny_distilled_patch16_224", depth=4), [1, 2], 0.6),
    "registers": lambda: evit_patch.apply_evit(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=4),
                                               [1, 2], 0.5),
    "dynamicvit": lambda: apply_dynamicvit(timm.create_model("deit_tiny_patch16_224", depth=6), (1, 3, 5), 0.7),
    "width-pruned": pruned_tiny,
    **{f"training-free, pooling {pooling}": (lambda pooling=pooling: evit_patch.apply_token_reducer(
        timm.create_model("deit_tiny_patch16_224", depth=4), [1, 2], 0.6, TrainingFreeEvit(pooling=pooling)))
       for pooling in ("always", "closer", "never")},
}


@pytest.mark.parametrize("case", list(CROSS_CHECKED))
def test_the_default_count_is_fvcores(case) -> None:
    """count_macs counts with torch's FlopCounterMode; fvcore, the reference the paper's
    table was counted with, must agree (docs/macs.md)."""
    model = CROSS_CHECKED[case]().eval()
    assert evit_patch.count_macs(model) == pytest.approx(evit_patch.count_macs(model, engine="fvcore"), rel=1e-3)


def test_an_unknown_engine_is_refused(deit_small) -> None:
    with pytest.raises(ValueError, match="engine must be 'torch' or 'fvcore'"):
        evit_patch.count_macs(deit_small, engine="ptflops")
