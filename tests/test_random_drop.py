"""RandomDrop keeps ceil(r n) image tokens chosen uniformly at random: afresh every training draw,
as a function of the image in evaluation.

Every statistical check runs on a fixed seed, so it passes or fails the same way on
every run; its threshold (p < 1e-6 under uniform selection) leaves any correct sampler
a vanishing chance of failing on any seed, while a biased one fails by orders of magnitude.
"""

import copy
import itertools
import math

import pytest
import timm
import torch

import evit_patch
from evit_patch import DROPPED, KEPT, kept_tokens
from evit_patch.reducers import LayerContext, RandomDrop

P_VALUE_FLOOR = 1e-6


def _context(keep_rate: float, prefix: int) -> LayerContext:
    return LayerContext(0, 0, keep_rate, prefix, "class", True)


def _attention(batch: int, tokens: int, peaked_on: int, heads: int = 2) -> tuple:
    """Fused-attention tensors whose class row puts nearly all weight on image token ``peaked_on``
    and then decreases with the index, so top-k scoring would keep the same tokens every time."""
    q = torch.zeros(batch, heads, tokens, 4)
    q[:, :, 0, 0] = 1.0
    k = torch.zeros(batch, heads, tokens, 4)
    k[:, :, :, 0] = -torch.arange(tokens, dtype=torch.float32)  # earlier tokens score higher
    k[:, :, peaked_on, 0] = 50.0
    return q, k, None, None


def _chi_square_p_value(counts: torch.Tensor, expected: float) -> float:
    """Survival function of the chi-square statistic of ``counts`` against equal cells."""
    statistic = float(((counts.double() - expected) ** 2 / expected).sum())
    degrees = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize("num_image, keep_rate", [(16, 0.5), (16, 0.8125), (10, 0.375), (7, 0.25), (8, 1.0)])
def test_the_count_the_prefix_and_the_tokens_themselves(prefix, num_image, keep_rate):
    keep = min(num_image, math.ceil(keep_rate * num_image))  # dyadic rates: the product is exact
    x = torch.randn(3, prefix + num_image, 5)
    attention = _attention(3, prefix + num_image, prefix + 1)
    reduction = RandomDrop(0).reduce(x, attention, _context(keep_rate, prefix))
    assert reduction.tokens.shape == (3, prefix + keep, 5)
    assert torch.equal(reduction.tokens[:, :prefix], x[:, :prefix])  # every prefix token, in place
    image = x[:, prefix:]
    for sample in range(3):
        index = reduction.kept_index[sample]
        assert len(set(index.tolist())) == keep and 0 <= int(index.min()) and int(index.max()) < num_image
        assert torch.equal(reduction.tokens[sample, prefix:], image[sample, index])
        kept_at = torch.full((num_image,), -1)
        kept_at[index] = torch.arange(keep)
        assert torch.equal(reduction.destination[sample], kept_at)  # the others are discarded, not fused
    assert not reduction.mixed.any()


def test_the_draw_ignores_the_attention():
    """Fed opposite attention, two reducers with one seed keep the same tokens; top-k would not."""
    x = torch.randn(4, 1 + 16, 5)
    first, second = RandomDrop(3), RandomDrop(3)
    for _ in range(5):
        towards_start = first.reduce(x, _attention(4, 17, 1), _context(0.5, 1)).kept_index
        towards_end = second.reduce(x, _attention(4, 17, 16), _context(0.5, 1)).kept_index
        assert torch.equal(towards_start, towards_end)


def test_every_forward_and_every_sample_draws_afresh():
    x = torch.randn(8, 1 + 16, 5)
    reducer = RandomDrop(0)
    draws = [reducer.reduce(x, _attention(8, 17, 1), _context(0.5, 1)).kept_index for _ in range(20)]
    kept_sets = {frozenset(sample.tolist()) for draw in draws for sample in draw}
    assert len(kept_sets) >= 150  # of 160 draws among C(16, 8) = 12870 sets: repeats are rare
    for draw in draws:
        assert len({frozenset(sample.tolist()) for sample in draw}) > 1  # not one draw for the whole batch


def test_each_token_is_kept_equally_often():
    """Over 4000 draws of 4 of 10 tokens under peaked attention, every token is kept about 1600 times."""
    x = torch.randn(500, 1 + 10, 2)
    reducer = RandomDrop(11)
    counts = torch.zeros(10)
    for _ in range(8):
        kept = reducer.reduce(x, _attention(500, 11, 1), _context(0.375, 1)).kept_index
        counts += torch.zeros(500, 10).scatter_(1, kept, 1.0).sum(0)
    assert counts.sum() == 4000 * 4
    assert _chi_square_p_value(counts, 1600.0) > P_VALUE_FLOOR


def test_every_kept_set_is_equally_likely():
    """Not only each token: all C(6, 3) = 20 sets of 3 of 6 tokens are drawn equally often
    (a random window or a shared draw would have uniform marginals but not this)."""
    x = torch.randn(1000, 6, 2)
    reducer = RandomDrop(5)
    subsets = {frozenset(s): i for i, s in enumerate(itertools.combinations(range(6), 3))}
    counts = torch.zeros(len(subsets))
    for _ in range(10):
        for sample in reducer.reduce(x, _attention(1000, 6, 0), _context(0.5, 0)).kept_index:
            counts[subsets[frozenset(sample.tolist())]] += 1
    assert _chi_square_p_value(counts, 10000 / 20) > P_VALUE_FLOOR


def test_on_a_model_each_layer_keeps_its_count_and_the_draw_follows_the_image():
    """In evaluation the draw is a function of the image (a served model answers one image
    the same way in any thread and order); other images, or training steps, draw afresh."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                              num_heads=3, reg_tokens=2).eval()
    patched = evit_patch.apply_token_reducer(copy.deepcopy(model), [1, 2], 0.5, RandomDrop(0))
    lengths = []
    hook = patched.norm.register_forward_hook(lambda module, inputs, output: lengths.append(inputs[0].shape[1]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = patched(images)
        first_layers = kept_tokens(patched)
        second = patched(images)
        second_layers = kept_tokens(patched)
        patched(torch.cat([images[1:], images[:1] + 1e-3]))
        other_layers = kept_tokens(patched)
        patched.train()
        trained = [patched(images) for _ in range(2)]
    hook.remove()
    assert lengths == [3 + 16] * 5  # 64 -> 32 -> 16 image tokens, the three prefix tokens kept
    assert [layer.kept_index.shape[1] for layer in first_layers] == [32, 16]
    assert ((first_layers[-1].status == KEPT).sum(1) == 16).all()
    assert ((first_layers[-1].status == DROPPED).sum(1) == 48).all()
    assert torch.equal(first, second) and torch.equal(first_layers[0].kept_index, second_layers[0].kept_index)
    assert torch.equal(other_layers[0].kept_index[0], first_layers[0].kept_index[1])  # the image, not its place
    assert not torch.equal(other_layers[0].kept_index[1], first_layers[0].kept_index[0])  # one pixel moved
    assert not torch.allclose(trained[0], trained[1])  # each training step draws afresh


def test_each_layer_draws_its_own_tokens():
    """The layer is part of the draw: with one image's keys, two layers over the same tokens keep
    different sets (a draw that ignored the layer would keep nested, correlated sets)."""
    from evit_patch.reducers.random import image_keys, random_kept_index

    keys = image_keys(torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)), seed=0)
    first, second = (random_kept_index(keys, 16, 8, layer) for layer in (0, 1))
    same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(first, second))
    assert same <= 2  # 64 samples, C(16, 8) = 12870 sets: equal by chance almost never
