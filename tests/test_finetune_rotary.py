"""A rotary-position model fine-tunes from a recipe with EViT and with the training-free variant:
the rotary base's recipe (timm's EVA-02 sized like the shipped base: 196 patches, a class
token) with reduction at blocks 1, 3, 4, a few steps on a Fashion-MNIST subset."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import evit_patch.train.loop as loop
from evit_patch import kept_tokens
from evit_patch.reducers import EvitReducer, TrainingFreeEvit
from evit_patch.train.assembly import rebuild
from evit_patch.train.recipe import load_recipe

ROTARY_BASE = Path(__file__).resolve().parents[1] / "recipes" / "fashion_mnist_rotary_pretrain.yaml"
PREFIX, PATCHES = 1, 196
VARIANTS = {"paper": ({}, EvitReducer, [138, 98, 70]),
            "training-free": ({"variant": "training-free"}, TrainingFreeEvit, [139, 99, 71])}


def _rotary_recipe(folder: Path, reduction: dict) -> Path:
    values = yaml.safe_load(ROTARY_BASE.read_text())
    values["reduction"] = {"enabled": True, "layers": [1, 3, 4], "keep_rate": 0.7, **reduction}
    values["data"].update(train_subset=64, eval_subset=32)
    values["train"].update(epochs=1, max_steps_per_epoch=2, batch_size=16, eval_batch_size=32,
                           output_dir=str(folder / "run"))
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_rotary_model_fine_tunes_from_a_recipe(tmp_path, variant):
    """Each block holds exactly prefix + kept (+ the fused or pooled) tokens, and the blocks after a
    reorganization that are not rewritten are given the rotary rows of exactly those tokens."""
    options, reducer_type, kept = VARIANTS[variant]
    recipe = load_recipe(_rotary_recipe(tmp_path, options))
    run = loop.train(recipe, show_progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"])
    model = rebuild(recipe, run / "model.safetensors")
    assert isinstance(model.evit_state.reducer, reducer_type)
    tokens, rows = [], {}
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda block, args, output: tokens.append(output.shape[1]))
        block.register_forward_pre_hook(
            lambda block, args, kwargs, index=index: rows.__setitem__(index, kwargs["rope"].shape[-2]), with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(3, 1, 28, 28))
    assert [layer.kept_index.shape[1] for layer in kept_tokens(model)] == kept
    assert tokens == [PREFIX + PATCHES, PREFIX + 139, PREFIX + 139, PREFIX + 99, PREFIX + 71, PREFIX + 71]
    assert rows[0] == rows[1] == PATCHES and rows[2] == 139 and rows[5] == 71
