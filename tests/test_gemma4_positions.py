"""timm's Gemma 4 towers (``gemma4_vit_*``): their ``rope_cos``/``rope_sin`` rows follow the kept tokens,
against the independent eager reference of :mod:`reference_gemma4_positions`, which runs the unpatched
model's own blocks on each sample's kept tokens with their own rows. Padded patches (a padding mask over
the full grid) are refused in one line; the soft-token pooler's towers are refused at patch time."""

from __future__ import annotations

import threading

import pytest
import timm
import torch
from patched_clones import pickled_and_copied
from reference_gemma4_positions import gemma4_reference, half_rows

import evit_patch
from evit_patch import UnsupportedModelError
from evit_patch.reducers import EvitReducer, ToMeMerge

TINY = {"depth": 4, "embed_dim": 64, "num_heads": 2, "head_dim": 32, "intermediate_size": 128,
        "position_embedding_size": 16}
CLASSIFIER = ("gemma4_vit_167m", {"num_classes": 10})
ENCODER = ("gemma4_vit_570m_enc", {"global_pool": "none", "num_kv_heads": 1})
MODELS = {"classifier (average pool)": CLASSIFIER, "encoder (tokens, grouped-query)": ENCODER}
LAYERS = [1, 2]
KEEP_RATE = 0.5
GRID = (4, 6)  # 64 x 96 px in 16 px patches: 24 patches, 12 kept and the fused one, then 7 and the fused one


def _model(name: str = CLASSIFIER[0], **kwargs) -> torch.nn.Module:
    """Random weights; a classifier gets a head of unit scale (timm's gives logits under the tolerance)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TINY, **(kwargs or CLASSIFIER[1])).eval()
    if isinstance(getattr(model, "head", None), torch.nn.Linear):
        torch.nn.init.normal_(model.head.weight, std=0.125)
    return model


def _images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 16 * GRID[0], 16 * GRID[1], generator=torch.Generator().manual_seed(seed))


def _padded_patches(images: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NaFlex-style ``(B, N, P*P*C)`` patches and ``(y, x)`` coordinates, the last ``padding`` marked -1."""
    batch = images.shape[0]
    patches = images.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 4, 5, 1).reshape(batch, -1, 16 * 16 * 3)
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], -1).expand(batch, -1, -1).clone()
    coords[:, coords.shape[1] - padding:] = -1
    return patches, coords


@pytest.mark.parametrize("name, kwargs", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("reducer", [EvitReducer(), EvitReducer(fuse=False), ToMeMerge()],
                         ids=["evit", "no-fusion", "tome"])
def test_keep_rate_one_is_the_unpatched_model_bitwise(name, kwargs, reducer):
    model = _model(name, **kwargs)
    images = _images()
    with torch.no_grad():
        expected = model(images)
        evit_patch.apply_token_reducer(model, LAYERS, 1.0, reducer)
        assert torch.equal(model(images), expected)
        evit_patch.set_keep_rate(model, KEEP_RATE)
        assert not torch.equal(model(images), expected)
        evit_patch.remove_evit(model)
        assert torch.equal(model(images), expected)


@pytest.mark.parametrize("name, kwargs", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("fuse", [False, True], ids=["pruning", "fused token unrotated"])
@pytest.mark.parametrize("fused_attention, tolerance", [(False, 1e-5), (True, 1e-4)], ids=["explicit softmax", "sdpa"])
def test_positions_follow_the_kept_tokens_as_the_eager_reference(name, kwargs, fuse, fused_attention, tolerance):
    """The reference reads its scores off the explicit softmax. Patched on that path too, the two agree
    to 1e-5; on timm's default fused path, scale-1 logits of unit-RMS queries and keys (up to 32) round
    differently there, by up to 7e-5 on the encoder's raw tokens (up to 8; the logits agree to 6e-6)."""
    model = _model(name, **kwargs)
    for block in getattr(model, "encoder", model).blocks:
        block.attn.fused_attn = fused_attention
    images = _images()
    with torch.no_grad():
        expected, positions = gemma4_reference(model, images, LAYERS, KEEP_RATE, fuse)
        evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, EvitReducer(fuse=fuse))
        output = model(images)
    torch.testing.assert_close(output, expected, rtol=tolerance, atol=tolerance)
    first, second = evit_patch.kept_tokens(model)
    for sample, (after_first, after_second) in enumerate(positions):  # the same tokens kept, in the same order
        assert first.kept_index[sample].tolist() == after_first[: len(after_first) - int(fuse)]
        assert [after_first[j] for j in second.kept_index[sample].tolist()] == after_second[: len(after_second) - int(fuse)]


@pytest.mark.parametrize("rule", ["members", "top-member"])
def test_a_rule_rotates_a_fused_token_as_the_reference_places_it(rule):
    """``members``: by its members' mean rows; ``top-member``: by its highest-scored dropped token's."""
    model = _model()
    images = _images()
    with torch.no_grad():
        expected, _ = gemma4_reference(model, images, LAYERS, KEEP_RATE, fuse=True, members=rule == "members",
                                       top_member=rule == "top-member")
        unrotated, _ = gemma4_reference(model, images, LAYERS, KEEP_RATE, fuse=True)
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
        evit_patch.set_position_rule(model, rule)
        logits = model(images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, unrotated, rtol=1e-5, atol=1e-5)  # the rule changed something


def test_a_merged_token_takes_its_representatives_rows_in_a_block_not_rewritten():
    """ToMe-style merging by the rule ``representative``: the block after the last layer (not rewritten,
    given its rows in their places by a hook) rotates each token as the grid token it stands for,
    composed through both layers."""
    model = _model()
    evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, ToMeMerge())
    evit_patch.set_position_rule(model, "representative")
    encoder = model.encoder
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    encoder.blocks[3].register_forward_pre_hook(lambda block, args: seen.append(args[1:3]))
    rotary: list[tuple[torch.Tensor, torch.Tensor]] = []
    encoder.rotary_emb.register_forward_hook(lambda module, args, output: rotary.append(output))
    with torch.no_grad():
        model(_images())
    first, second = evit_patch.kept_tokens(model)
    (cos, sin), (seen_cos, seen_sin) = rotary[0], seen[0]
    for sample in range(2):
        grid = first.kept_index[sample][second.kept_index[sample]].tolist()
        assert torch.equal(seen_cos[sample:sample + 1], half_rows(cos[sample], grid, 1.0))
        assert torch.equal(seen_sin[sample:sample + 1], half_rows(sin[sample], grid, 0.0))


@pytest.mark.parametrize("fuse", [False, True], ids=["pruning", "fusion"])
def test_exact_token_counts_and_macs(fuse):
    model = _model()
    dense = evit_patch.count_macs(model, img_size=(64, 96))
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE, fuse=fuse)
    lengths: list[int] = []
    for block in model.encoder.blocks:
        block.register_forward_hook(lambda module, args, output: lengths.append(output.shape[1]))
    with torch.no_grad():
        model(_images())
    first, second = evit_patch.kept_tokens(model)
    assert first.kept_index.shape == (2, 12) and second.kept_index.shape == (2, 7 if fuse else 6)
    assert lengths == ([24, 13, 8, 8] if fuse else [24, 12, 6, 6])
    assert evit_patch.count_macs(model, img_size=(64, 96)) < dense


def test_pickled_and_copied_models_follow_positions():
    model = _model()
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    for clone in pickled_and_copied(model, _images()):
        assert not clone.encoder.blocks[3]._forward_pre_hooks


def test_bf16_autocast_runs_with_the_same_token_counts():
    model = _model()
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(_images())
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert [record.kept_index.shape[1] for record in evit_patch.kept_tokens(model)] == [12, 7]


def test_concurrent_calls_follow_their_own_tokens():
    """The composed maps are per call: two threads' forwards never gather each other's rows."""
    model = _model()
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    batches = [_images(seed=seed) for seed in range(4)]
    with torch.no_grad():
        expected = [model(images) for images in batches]
    failures: list[int] = []

    def run(offset: int) -> None:
        with torch.no_grad():
            for step in range(6):
                index = (offset + step) % len(batches)
                if not torch.equal(model(batches[index]), expected[index]):
                    failures.append(index)

    threads = [threading.Thread(target=run, args=(offset,)) for offset in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_padded_patches_are_refused_in_one_line_and_unpadded_ones_work():
    model = _model(ENCODER[0], global_pool="none")
    images = _images()
    patches, coords = _padded_patches(images, padding=0)
    with torch.no_grad():
        expected = model(images)
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
        reduced = model(images)
        assert torch.equal(model(patches, patch_coord=coords), reduced)
        assert not torch.equal(reduced[:, :13], expected[:, :13])
        with pytest.raises(ValueError, match=r"padded patches .* give a padding mask over the full patch grid"):
            model(*_padded_patches(images, padding=3))
        assert torch.equal(model(images), reduced)


@pytest.mark.parametrize("name, kwargs", [("gemma4_vit_167m_enc", {}), ("gemma4_vit_167m", {"encoder_pool": "soft"})],
                         ids=["encoder", "classifier"])
def test_the_soft_token_pooler_is_refused_at_patch_time(name, kwargs):
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    with pytest.raises(UnsupportedModelError, match="reads the blocks' output as the full patch grid"):
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    assert not evit_patch.is_patched(model)
