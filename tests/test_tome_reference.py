"""ToMe-style merging against the independent eager reference in tests/reference_tome.py.

The model is chosen so that each plausible wrong merge changes the result: raw dot
products of the keys pick other pairs than cosine similarity, the head max of the keys
other pairs than their head mean, later layers merge tokens of unequal sizes (so a
plain mean differs from the size-weighted one), and proportional attention changes the
logits. Each of these is asserted on the reference itself, so the comparison cannot
pass for want of a difference.
"""

import copy

import pytest
import timm
import torch
from reference_tome import merged_count, token_of_patch, tome_forward

import evit_patch
from evit_patch import FUSED, KEPT, kept_tokens

LAYERS = [0, 1, 2]
KEEP_RATE = 0.55  # 64 -> 37 -> 22 -> 14 image tokens: 27, 15 and 8 merges
NUM_PATCHES = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A 4-block ViT on 32 px images in 4 px patches (64 image tokens), float64, with a
    class token and two register tokens (three prefix tokens, none of them merged).

    The keys' channels are scaled unevenly so that key norms differ from token to token:
    raw dot products then favour long keys and pick other partners than cosine.
    """
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                              num_heads=3, reg_tokens=2).eval().double()
    with torch.no_grad():
        for block in model.blocks:
            keys = block.attn.qkv.weight[48:96]
            keys.mul_(torch.linspace(0.2, 3.0, 48, dtype=torch.float64)[torch.randperm(48)][:, None])
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _merges(records):
    return [[sample.kept_index for sample in layer] for layer in records]


def _unequal_size_merges(records) -> int:
    """Output tokens formed from incoming tokens of different sizes, over all layers and samples."""
    count = 0
    for before, layer in zip(records, records[1:]):
        for previous, sample in zip(before, layer):
            members: dict[int, set] = {}
            for token, target in enumerate(sample.destination):
                members.setdefault(target, set()).add(previous.sizes[token])
            count += sum(len(held) > 1 for held in members.values())
    return count


@pytest.fixture(scope="module")
def reference(model, images):
    """The reference (with and without proportional attention) and proof that the model tells wrong merges apart."""
    results = {proportional: tome_forward(model, images, LAYERS, KEEP_RATE, proportional)
               for proportional in (True, False)}
    logits, records = results[True]
    assert len(records) == len(LAYERS)
    assert min(sample.margin for layer in records for sample in layer) > 1e-5  # no decision is left to rounding
    _, dot_records = tome_forward(model, images, LAYERS, KEEP_RATE, similarity="dot")
    assert _merges(dot_records)[0] != _merges(records)[0]  # raw dot products merge other pairs
    _, max_records = tome_forward(model, images, LAYERS, KEEP_RATE, head_reduce="max")
    assert _merges(max_records)[0] != _merges(records)[0]  # so does the head max of the keys
    assert _unequal_size_merges(records) >= 5  # a plain mean would differ from the size-weighted one
    assert not torch.allclose(results[False][0], logits, rtol=1e-6, atol=1e-6)  # proportional attention matters
    return results


def _patched(model, fused: bool, proportional: bool):
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.attn.fused_attn = fused
    return evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, evit_patch.reducers.ToMeMerge(proportional))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("proportional", [True, False], ids=["proportional", "plain"])
def test_tome_equals_the_reference_logits_merges_provenance_and_sizes(model, images, reference, fused, proportional):
    expected, records = reference[proportional]
    patched = _patched(model, fused, proportional)
    with torch.no_grad():
        logits = patched(images)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)

    layers = kept_tokens(patched)
    assert len(layers) == len(records)
    patch_token = token_of_patch(records, NUM_PATCHES)
    count = NUM_PATCHES
    for layer, record, held in zip(layers, records, patch_token):
        count = merged_count(count, KEEP_RATE)
        assert layer.kept_index.shape == (2, count)
        assert layer.kept_index.tolist() == [sample.kept_index for sample in record]  # order: [unmerged A, B]
        assert layer.token_of_patch.tolist() == held
        sizes = torch.tensor([sample.sizes for sample in record], dtype=torch.float64)
        assert torch.equal(layer.status == FUSED, sizes.gather(1, layer.token_of_patch) > 1)
        assert torch.equal(layer.status == KEPT, sizes.gather(1, layer.token_of_patch) == 1)

    # the sizes carried to later attention are the patches each output token holds
    held = torch.zeros(2, count, dtype=torch.float64).scatter_add_(
        1, layers[-1].token_of_patch, torch.ones(2, NUM_PATCHES, dtype=torch.float64))
    assert torch.equal(patched.evit_state.reducer.sizes.to(torch.float64), held)
    assert held.tolist() == [sample.sizes for sample in records[-1]]


def test_carry_restoration_follows_the_reference_merges(model, images, reference):
    """Fill ``carry`` after merging, with three prefix tokens: at every block, a patch alone in its
    token gets that token's output, any other its row of the grid entering the last merging layer;
    which patch is where comes from the reference's own merges, not from the package's maps."""
    _, records = reference[True]
    patched = _patched(model, True, True)
    evit_patch.set_restoration(patched, "carry")
    outputs = {}
    handles = [block.register_forward_hook(lambda _, args, output, i=i: outputs.__setitem__(i, output))
               for i, block in enumerate(patched.blocks)]
    handles.append(patched.blocks[0].register_forward_pre_hook(lambda _, args: outputs.__setitem__(-1, args[0])))
    with torch.no_grad():
        patched(images)
        for handle in handles:
            handle.remove()
        got = patched.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True,
                                            intermediates_only=True)
    prefix, held = patched.num_prefix_tokens, token_of_patch(records, NUM_PATCHES)
    restored, entering, mixed_patches = [], outputs[-1], 0
    for block, (grid, prefix_tokens) in enumerate(got):
        layer = min(block, len(LAYERS) - 1)
        if block in LAYERS:
            entering = restored[-1] if block else outputs[-1]
        expected = entering.clone()
        expected[:, :prefix] = outputs[block][:, :prefix]
        for b, record in enumerate(records[layer]):
            for patch, token in enumerate(held[layer][b]):
                if record.sizes[token] == 1:
                    expected[b, prefix + patch] = outputs[block][b, prefix + token]
                else:
                    mixed_patches += 1
        restored.append(expected)
        assert torch.equal(torch.cat([prefix_tokens, grid], dim=1), expected)
    assert mixed_patches > 0 and mixed_patches < len(got) * 2 * NUM_PATCHES  # both kinds of patch occur
