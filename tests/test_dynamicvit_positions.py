"""DynamicViT on timm's rotary ``Eva`` models: training masks keep the whole sequence (every
block takes the full table); inference prunes, and each block from the first stage on takes
the rows of the tokens it holds, against the independent eager reference of
:mod:`reference_dynamicvit_positions`. Concurrent calls and torch.compile:
``test_concurrency.py`` and ``test_compile.py`` (``every_method.small_rotary_vit``)."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from reference_dynamicvit_positions import dynamicvit_reference

import evit_patch.dynamicvit.stages as stages
from evit_patch.dynamicvit import apply_dynamicvit, dynamicvit_state, remove_dynamicvit

SMALL = {"depth": 4, "embed_dim": 64, "num_heads": 2, "img_size": 64, "num_classes": 10, "global_pool": "token"}
ROTARY_MODELS = {
    "eva02": "eva02_tiny_patch14_224",
    "dinov3 (registers)": "vit_small_patch16_dinov3",
    "perception encoder": "vit_pe_core_tiny_patch16_384",
    "rope-vit mixed": "vit_small_patch16_rope_mixed_224",
}
LAYERS = [1, 2]
KEEP_RATE = 0.6
PATCHES = 16
SHARPER = 10.0
"""Queries and keys scaled by this and LayerScale set to 1: at random init attention is near
uniform (RoPE-ViT's LayerScale starts at 1e-5), and rows given to the wrong tokens would change
the features by 1e-7 only."""


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if key.endswith(("attn.qkv.weight", "attn.q_proj.weight", "attn.k_proj.weight")):
                parameter[: parameter.shape[0] * 2 // 3 if key.endswith("qkv.weight") else None] *= SHARPER
            if key.endswith(("gamma_1", "gamma_2")):
                parameter.fill_(1.0)
    return model


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ROTARY_MODELS.values(), ids=ROTARY_MODELS.keys())
def test_inference_follows_the_kept_tokens_as_the_eager_reference(name):
    base = _model(name)
    model = apply_dynamicvit(copy.deepcopy(base), LAYERS, KEEP_RATE)
    images = _images()
    with torch.no_grad():
        expected, positions = dynamicvit_reference(base, model.dynamicvit_predictors, images, LAYERS, KEEP_RATE)
        features = model.forward_features(images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    kept = dynamicvit_state(model).record.kept_indices
    assert [indices.tolist() for indices in kept] == [list(stage) for stage in zip(*positions)]
    assert [indices.shape[1] for indices in kept] == [9, 5]  # int(16 * 0.6), int(16 * 0.36)


def test_training_keeps_the_whole_sequence_and_the_whole_table():
    model = apply_dynamicvit(_model("eva02_tiny_patch14_224"), LAYERS, KEEP_RATE).train()
    tables: list[torch.Tensor] = []
    model.blocks[3].register_forward_pre_hook(lambda block, args, kwargs: tables.append(kwargs["rope"]), with_kwargs=True)
    logits = model(_images())
    logits.sum().backward()
    record = dynamicvit_state(model).record
    assert [policy.shape for policy in record.policies] == [(2, PATCHES)] * 2
    assert record.final_tokens.shape == (2, 1 + PATCHES, 64) and not record.kept_indices
    assert torch.equal(tables[0], model.rope.get_embed())
    assert all(predictor.embed[1].weight.grad is not None for predictor in model.dynamicvit_predictors)


def test_inference_equals_training_restricted_to_the_kept_tokens(monkeypatch):
    """With decisions equal to inference's top-k choice, training (full table, masked keys) and
    inference (pruned tokens, gathered rows) compute the same logits."""
    model = apply_dynamicvit(_model("vit_small_patch16_dinov3").double(), LAYERS, KEEP_RATE)
    state = dynamicvit_state(model)
    state.key_weights.eps = 0.0
    images = _images().double()
    with torch.no_grad():
        expected = model.eval().forward_features(images)[:, 0]

    def top_k_decisions(log_probabilities: torch.Tensor) -> torch.Tensor:
        record = state.record
        stage = len(record.policies)
        previous = record.policies[-1] if stage else torch.ones_like(log_probabilities[..., 0])
        scores = log_probabilities[..., 0].masked_fill(previous == 0, float("-inf"))
        chosen = scores.topk(state.kept_count(record.num_image_tokens, stage), dim=1).indices
        return torch.zeros_like(previous).scatter(1, chosen, 1.0)

    monkeypatch.setattr(stages, "gumbel_keep_decisions", top_k_decisions)
    with torch.no_grad():
        torch.testing.assert_close(model.train().forward_features(images)[:, 0], expected, rtol=1e-9, atol=1e-9)


def test_removal_is_exact_and_pickled_models_follow():
    base = _model("vit_small_patch16_rope_mixed_224")
    model = apply_dynamicvit(copy.deepcopy(base), LAYERS, KEEP_RATE)
    images = _images()
    with torch.no_grad():
        expected = model(images)
        clone = pickle.loads(pickle.dumps(model))
        assert torch.equal(clone(images), expected)
        for patched in (model, clone):
            remove_dynamicvit(patched)
            assert not any(block._forward_pre_hooks for block in patched.blocks)
            assert torch.equal(patched(images), base(images))
