"""A token method is registered once, and every caller reads the registry: a method
registered here (the worked example of docs/architecture.md, run as it stands there) runs
through ``apply_token_reducer``, a recipe and ``compare.py``; an unknown name is refused in
one line, never run as EViT."""

import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from benchmark_scripts import load_benchmark
from finetune_helpers import TINY, write_recipe

import evit_patch
from evit_patch.reducers import EvitReducer, TrainingFreeEvit
from evit_patch.reducers.registry import TokenMethod, register_token_method, token_method, token_methods, unregister_token_method
from evit_patch.train.methods import METHODS, recipe_method, recipe_reducer
from evit_patch.train.recipe import RecipeError, load_recipe

DOCS = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


@pytest.fixture
def strided():
    """The docs' example method, registered for one test."""
    text = DOCS.read_text()
    section = text[text.index("## Adding a method"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    yield namespace
    unregister_token_method("strided")


def test_the_documented_method_patches_a_model(strided) -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=3).eval()
    evit_patch.apply_token_reducer(model, [1], 0.5, strided["StridedDrop"](3))
    model(torch.randn(2, 3, 32, 32))
    (layer,) = evit_patch.kept_tokens(model)
    assert layer.kept_index[0].tolist() == [0, 3, 6, 9, 12, 15, 1, 2]  # every 3rd, then the others, 8 of 16


def test_a_recipe_selects_the_documented_method_with_its_option(strided, tmp_path) -> None:
    recipe = load_recipe(write_recipe(tmp_path), ["reduction.method=strided", "reduction.stride=3"])
    assert recipe_method(recipe).label == "strided drop"
    reducer = recipe_reducer(recipe)
    assert isinstance(reducer, strided["StridedDrop"]) and reducer.stride == 3
    assert "strided" in METHODS and list(METHODS)[-3] == "strided"  # after the registered token methods


def test_compare_fine_tunes_and_tables_the_documented_method(strided, tmp_path, monkeypatch) -> None:
    compare = load_benchmark("compare")
    out = tmp_path / "table"
    tiny = ["model.checkpoint=null", "model.kwargs.embed_dim=16", "model.kwargs.patch_size=4", "model.kwargs.num_heads=2",
            "data.train_subset=64", "data.eval_subset=32", "train.batch_size=32", "train.benchmark_batch_size=4"]
    monkeypatch.setattr(sys, "argv", ["compare.py", *[p for o in tiny for p in ("--set", o)], "--methods", "strided",
                                      "--keep-rates", "0.5", "--repeats", "1", "--steps", "2", "--out", str(out)])
    compare.main()
    unpatched, row = json.loads(out.with_suffix(".json").read_text())["rows"]  # the baseline always runs
    assert unpatched["method"] == "unpatched"
    assert (row["method"], row["family"], row["keep_rate"]) == ("strided", "strided drop", 0.5)
    assert "| strided drop | 0.5 | keep 0.5 |" in out.with_suffix(".md").read_text()
    run = compare.read_run_recipe(out.parent / "table_runs" / "strided_0.5" / "steps_2" / "recipe.yaml")
    assert run.reduction.method == "strided" and run.reduction.stride == 2


def test_every_table_and_choice_lists_the_registry() -> None:
    throughput = load_benchmark("throughput")
    registered = list(token_methods())
    assert list(METHODS) == ["unpatched", *registered, "dynamicvit", "width-pruning"]
    assert throughput.TIMED_METHODS == [name for name in METHODS if name not in ("unpatched", "oracle")]
    assert registered[:3] == ["evit", "evit-no-fusion", "evit-training-free"]


def test_the_training_free_variant_is_a_method_of_its_own(tmp_path) -> None:
    assert token_method("evit-training-free").form_of == ("evit", {"variant": "training-free"})
    for overrides in (["reduction.method=evit-training-free"], ["reduction.variant=training-free"]):
        recipe = load_recipe(write_recipe(tmp_path), overrides)
        assert recipe_method(recipe).name == "evit-training-free"
        assert type(recipe_reducer(recipe)) is TrainingFreeEvit
    no_fusion = load_recipe(write_recipe(tmp_path), ["reduction.fuse=false"])
    assert recipe_method(no_fusion).name == "evit-no-fusion" and recipe_reducer(no_fusion).fuse is False


def test_an_unknown_method_is_one_line_with_the_closest_name_and_never_runs_as_evit(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"^reduction\.method: no token method 'tomee'; .*did you mean 'tome'\?$"):
        load_recipe(write_recipe(tmp_path), ["reduction.method=tomee"])
    with pytest.raises(ValueError, match="did you mean 'random'"):
        token_method("randon")
    with pytest.raises(KeyError, match="did you mean 'random'"):
        METHODS["randon"]
    recipe = load_recipe(write_recipe(tmp_path))
    recipe.reduction.method = "unregistered"  # past validation: still refused, not EViT
    with pytest.raises(ValueError, match="no token method 'unregistered'"):
        recipe_reducer(recipe)
    assert type(recipe_reducer(load_recipe(write_recipe(tmp_path)))) is EvitReducer


def test_a_registration_that_clashes_is_refused() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class SeedAsText:
        seed: str = "0"  # random drop's seed is an int: one recipe key cannot be both

    with pytest.raises(ValueError, match="option 'seed'"):
        register_token_method(TokenMethod("clash", "clash", EvitReducer, SeedAsText))
    with pytest.raises(ValueError, match="registered already"):
        register_token_method(TokenMethod("evit", "another EViT", EvitReducer))
    assert "clash" not in token_methods() and TINY["reduction"]["keep_rate"] == 0.5


def test_the_docs_list_every_registered_method_and_option() -> None:
    text = " ".join((DOCS.parent / "finetuning.md").read_text().split())
    listed = re.search(r"methods: (.*?) —", text).group(1)
    assert re.findall(r"`([\w-]+)`", listed) == list(token_methods())
    for method in token_methods().values():
        for option in method.option_types():
            assert f"`{option}`" in text, option


def test_a_method_option_is_a_typed_recipe_key_with_its_range(tmp_path) -> None:
    assert load_recipe(write_recipe(tmp_path), ["reduction.method=random", "reduction.seed=7"]).reduction.seed == 7
    with pytest.raises(RecipeError, match=r"^reduction\.seed: must be an integer in \[0, 2\*\*63\), got -1$"):
        load_recipe(write_recipe(tmp_path), ["reduction.method=random", "reduction.seed=-1"])
    with pytest.raises(RecipeError, match=r"^reduction\.seed: expected int, got 'x'$"):
        load_recipe(write_recipe(tmp_path), ["reduction.seed=x"])
