"""Width pruning (heads, MLP channels) to EViT's MAC budget: cost, shapes, exactness, reload."""

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from finetune_helpers import tiny_recipe
from hypothesis import given, settings
from hypothesis import strategies as st

import evit_patch
import evit_patch.train.loop as loop
from evit_patch.core.model_info import native_input_shape
from evit_patch.tools.evaluate import main as evaluate_main
from evit_patch.train import distributed
from evit_patch.train.assembly import prepare_model, rebuild
from evit_patch.train.checkpoint import load_weights, save_weights
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import RecipeError, load_recipe, recipe_from_dict, reduces_tokens
from evit_patch.width_pruning import TOLERANCE, apply_pruned_shape, prune_to_macs, pruned_shape

ROOT = Path(__file__).resolve().parent.parent


def fashion_mnist_vit() -> torch.nn.Module:
    """The trained base ViT of the embedded default recipe."""
    return build_model(load_recipe(ROOT / "recipes" / "fashion_mnist.yaml").model)


def deit_s() -> torch.nn.Module:
    return timm.create_model("deit_small_patch16_224")


def small_vit(**kwargs) -> torch.nn.Module:
    options = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5) | kwargs
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


MODELS = {"fashion_mnist": (fashion_mnist_vit, [1, 3, 4]), "deit_s": (deit_s, [3, 6, 9])}
CASES = [pytest.param(("fashion_mnist", 0.7), id="fashion_mnist-keep0.7"),
         pytest.param(("fashion_mnist", 0.5), id="fashion_mnist-keep0.5"),
         pytest.param(("deit_s", 0.7), id="deit_s-keep0.7", marks=pytest.mark.slow),  # about 30 s on 2 CPU cores
         pytest.param(("deit_s", 0.5), id="deit_s-keep0.5", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=CASES)
def pruned(request):
    """(builder, unpruned model, model pruned to EViT's cost, that cost)."""
    name, keep = request.param
    build, layers = MODELS[name]
    model = build().eval()
    original = copy.deepcopy(model)
    target = evit_patch.count_macs(evit_patch.apply_evit(copy.deepcopy(model), layers, keep))
    assert prune_to_macs(model, target) is model
    return build, original, model, target


def image(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *native_input_shape(model), generator=torch.Generator().manual_seed(0))


def test_pruned_model_costs_the_evit_budget_within_3_percent(pruned) -> None:
    _, original, model, target = pruned
    macs = evit_patch.count_macs(model)
    assert (1 - TOLERANCE) * target <= macs <= target
    assert macs < evit_patch.count_macs(original)


def test_heads_and_mlp_shrink_and_stay_consistent(pruned) -> None:
    _, original, model, _ = pruned
    width = original.embed_dim
    for before, after in zip(original.blocks, model.blocks):
        attention, mlp = after.attn, after.mlp
        assert 1 <= attention.num_heads < before.attn.num_heads and 1 <= mlp.fc1.out_features < before.mlp.fc1.out_features
        assert attention.head_dim == before.attn.head_dim
        assert attention.num_heads * attention.head_dim == attention.attn_dim == attention.proj.in_features
        assert attention.qkv.out_features == 3 * attention.attn_dim
        assert mlp.fc2.in_features == mlp.fc1.out_features
        assert attention.qkv.in_features == attention.proj.out_features == mlp.fc1.in_features == mlp.fc2.out_features == width
    shape = pruned_shape(model)
    assert len(set(shape["heads"])) == 1 and len(set(shape["mlp_hidden"])) == 1  # the same widths in every block
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())
    assert model(image(model)).shape == (2, original.num_classes)


def test_state_dict_loads_into_a_fresh_model_narrowed_to_the_saved_shape(pruned, tmp_path) -> None:
    build, _, model, _ = pruned
    save_weights(model, tmp_path / "pruned.safetensors")
    fresh = apply_pruned_shape(build(), pruned_shape(model), importance="random")
    with pytest.raises(RuntimeError, match="size mismatch"):
        build().load_state_dict(model.state_dict())
    load_weights(fresh, tmp_path / "pruned.safetensors")
    inputs = image(model)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(inputs), model(inputs))


def dropped_head_reference(attention: torch.nn.Module, x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The unpruned attention, eagerly, with the outputs of the heads not in ``kept`` zeroed."""
    batch, tokens, _ = x.shape
    q, k, v = F.linear(x, attention.qkv.weight, attention.qkv.bias).reshape(
        batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    heads = ((q @ k.transpose(-2, -1)) * attention.head_dim ** -0.5).softmax(-1) @ v
    mask = torch.zeros(attention.num_heads)
    mask[kept] = 1
    return attention.proj((heads * mask[:, None, None]).transpose(1, 2).reshape(batch, tokens, -1))


def kept_slices(before: torch.Tensor, after: torch.Tensor, size: int) -> list[int]:
    """Which ``size``-wide column slices of ``before`` survive, in order, in ``after``."""
    pieces = [after[:, start:start + size] for start in range(0, after.shape[1], size)]
    kept = [index for index in range(before.shape[1] // size)
            if any(torch.equal(before[:, index * size:(index + 1) * size], piece) for piece in pieces)]
    assert len(kept) == len(pieces)
    return kept


def test_pruned_blocks_compute_exactly_the_kept_heads_and_channels() -> None:
    original = small_vit(depth=3, embed_dim=96, num_heads=6)
    model = apply_pruned_shape(copy.deepcopy(original), {"heads": [4, 1, 6], "mlp_hidden": [100, 7, 384]})
    x = torch.randn(2, 17, 96)
    with torch.no_grad():
        for before, after in zip(original.blocks, model.blocks):
            heads = kept_slices(before.attn.proj.weight, after.attn.proj.weight, before.attn.head_dim)
            assert torch.allclose(after.attn(x), dropped_head_reference(before.attn, x, heads), atol=1e-6)
            channels = kept_slices(before.mlp.fc2.weight, after.mlp.fc2.weight, 1)
            mask = torch.zeros(before.mlp.fc1.out_features)
            mask[channels] = 1
            expected = before.mlp.fc2(before.mlp.act(before.mlp.fc1(x)) * mask)
            assert torch.allclose(after.mlp(x), expected, atol=1e-6)


def test_magnitude_importance_drops_the_weakest_heads_and_channels() -> None:
    model = small_vit()
    attention, mlp = model.blocks[0].attn, model.blocks[0].mlp
    with torch.no_grad():
        for part in range(3):  # head 2's q, k and v rows and the proj columns reading it
            attention.qkv.weight[part * 64 + 32:part * 64 + 48] = 0
            attention.qkv.bias[part * 64 + 32:part * 64 + 48] = 0
        attention.proj.weight[:, 32:48] = 0
        mlp.fc1.weight[[5, 9]] = 0
        mlp.fc1.bias[[5, 9]] = 0
        mlp.fc2.weight[:, [5, 9]] = 0
    original = copy.deepcopy(model)
    apply_pruned_shape(model, {"heads": [3, 4], "mlp_hidden": [254, 256]})
    kept = [column for column in range(64) if not 32 <= column < 48]
    assert torch.equal(model.blocks[0].attn.proj.weight, original.blocks[0].attn.proj.weight[:, kept])
    channels = [channel for channel in range(256) if channel not in (5, 9)]
    assert torch.equal(model.blocks[0].mlp.fc1.weight, original.blocks[0].mlp.fc1.weight[channels])


@settings(max_examples=8, deadline=None)
@given(heads=st.lists(st.integers(1, 4), min_size=2, max_size=2),
       hidden=st.lists(st.integers(1, 256), min_size=2, max_size=2),
       importance=st.sampled_from(["magnitude", "random"]))
def test_any_shape_is_applied_exactly(heads, hidden, importance) -> None:
    model = apply_pruned_shape(small_vit(), {"heads": heads, "mlp_hidden": hidden}, importance=importance)
    assert pruned_shape(model) == {"heads": heads, "mlp_hidden": hidden}
    for block, kept in zip(model.blocks, heads):
        assert block.attn.qkv.weight.shape == (3 * 16 * kept, 64) and block.attn.attn_dim == 16 * kept
    assert torch.isfinite(model(image(model))).all()


def snapshot(model: torch.nn.Module) -> tuple:
    return ({key: value.clone() for key, value in model.state_dict().items()}, pruned_shape(model),
            [(block.attn, block.mlp) for block in model.blocks])


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    state, shape, modules = before
    assert pruned_shape(model) == shape
    assert [(block.attn, block.mlp) for block in model.blocks] == modules
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_unreachable_or_invalid_targets_fail_and_leave_the_model_as_it_was() -> None:
    model = small_vit()
    before = snapshot(model)
    full = evit_patch.count_macs(model)
    with pytest.raises(ValueError, match=r"unreachable: with one head and one MLP channel per block .* still costs"):
        prune_to_macs(model, 0.05 * full)
    with pytest.raises(ValueError, match="above the unpruned cost"):
        prune_to_macs(model, 2 * full)
    for bad in (0, -1.0, "1e6", True):
        with pytest.raises(ValueError, match="positive number"):
            prune_to_macs(model, bad)
    with pytest.raises(ValueError, match="importance must be"):
        prune_to_macs(model, 0.7 * full, importance="taylor")
    assert_unchanged(model, before)
    assert prune_to_macs(model, full) is model  # already within the budget: nothing to prune
    assert_unchanged(model, before)


def test_bad_shapes_fail_and_leave_the_model_as_it_was() -> None:
    model = small_vit()
    before = snapshot(model)
    for shape, message in [({"heads": [2, 2]}, "exactly the keys"),
                           ({"heads": [2], "mlp_hidden": [9, 9]}, r"shape\['heads'\] must list one width per block \(2\)"),
                           ({"heads": [0, 2], "mlp_hidden": [9, 9]}, r"shape\['heads'\]\[0\] must be an integer from 1 to 4"),
                           ({"heads": [2, 2], "mlp_hidden": [9, 257]}, r"from 1 to 256 .*cannot widen"),
                           ({"heads": [2, True], "mlp_hidden": [9, 9]}, "must be an integer")]:
        with pytest.raises(ValueError, match=message):
            apply_pruned_shape(model, shape)
    assert_unchanged(model, before)
    apply_pruned_shape(model, {"heads": [2, 3], "mlp_hidden": [9, 9]})
    with pytest.raises(ValueError, match="same widths in every block"):
        prune_to_macs(model, 0.5 * evit_patch.count_macs(model))


def test_models_it_cannot_narrow_are_refused() -> None:
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        pruned_shape("deit")
    with pytest.raises(evit_patch.UnsupportedModelError, match="no `blocks`"):
        prune_to_macs(torch.nn.Linear(4, 4), 10)
    with pytest.raises(evit_patch.UnsupportedModelError, match="q/k normalization"):
        prune_to_macs(small_vit(qk_norm=True), 10)
    with pytest.raises(evit_patch.UnsupportedModelError, match="not a timm Mlp"):
        pruned_shape(small_vit(mlp_layer=timm.layers.SwiGLU))
    patched = evit_patch.apply_evit(small_vit(), [1], 0.5)
    with pytest.raises(ValueError, match="patched with EViT; prune its width before apply_evit"):
        prune_to_macs(patched, 10)


def test_recipe_prunes_to_the_evit_budget_instead_of_applying_evit(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path, {"structural": {"enabled": True}})
    assert not reduces_tokens(recipe) and recipe.structural.shape is None
    assert recipe.reduction.enabled is True  # validation leaves the recipe as written
    model = prepare_model(recipe)
    assert not evit_patch.is_patched(model)
    target = evit_patch.count_macs(evit_patch.apply_evit(build_model(recipe.model), [1], 0.5))
    assert (1 - TOLERANCE) * target <= evit_patch.count_macs(model) <= target
    assert pruned_shape(model) == {"heads": recipe.structural.shape.heads, "mlp_hidden": recipe.structural.shape.mlp_hidden}
    explicit = prepare_model(tiny_recipe(tmp_path, {"structural": {"enabled": True, "target_macs": 0.9 * target}}))
    assert (1 - TOLERANCE) * 0.9 * target <= evit_patch.count_macs(explicit) <= 0.9 * target


def test_structural_recipe_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(RecipeError, match="structural: enabled without a budget"):
        tiny_recipe(tmp_path, {"structural": {"enabled": True, "match_evit": False}})
    with pytest.raises(RecipeError, match="did you mean 'magnitude'"):
        tiny_recipe(tmp_path, {"structural": {"importance": "magnitud"}})
    with pytest.raises(RecipeError, match="structural: target .* is unreachable"):
        prepare_model(tiny_recipe(tmp_path, {"structural": {"enabled": True, "target_macs": 1000}}))


RUN_OVERRIDES = {"structural": {"enabled": True}, "train": {"epochs": 1, "max_steps_per_epoch": 2, "benchmark_batch_size": 8}}


@pytest.fixture(scope="module")
def width_pruned_run(tmp_path_factory):
    """A one-epoch width-pruned fine-tuning run: its folder and its final model."""
    recipe = tiny_recipe(tmp_path_factory.mktemp("structural_run"), RUN_OVERRIDES)
    return loop.run_training(recipe, None, distributed.Runtime(torch.device("cpu")), show_progress=False)


def test_width_pruned_run_is_rebuilt_from_its_folder(width_pruned_run, capsys) -> None:
    run, model = width_pruned_run
    saved = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
    assert not reduces_tokens(saved)
    assert {"heads": saved.structural.shape.heads, "mlp_hidden": saved.structural.shape.mlp_hidden} == pruned_shape(model)
    rebuilt = rebuild(saved, run / "model.safetensors")
    inputs = image(rebuilt)
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), model.eval()(inputs))
    evaluate_main([str(run)])
    assert "| width-pruned |" in capsys.readouterr().out


def test_width_pruned_run_resumes_from_its_checkpoint(width_pruned_run) -> None:
    run, _ = width_pruned_run
    overrides = copy.deepcopy(RUN_OVERRIDES)
    overrides["train"].update(epochs=2, output_dir=str(run))
    loop.train(tiny_recipe(run.parent, overrides), resume=str(run / "checkpoint.pth"), show_progress=False)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
