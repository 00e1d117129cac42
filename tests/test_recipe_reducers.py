"""Recipes choose the reducer; training and evaluation rebuild the same method."""

import pytest
import torch
from finetune_helpers import tiny_recipe

import evit_patch.train.loop as loop
from evit_patch import kept_tokens
from evit_patch.reducers import EvitReducer, RandomDrop, ToMeMerge
from evit_patch.reducers.oracle import OracleGuided
from evit_patch.train.assembly import rebuild
from evit_patch.train.checkpoint import save_weights
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import RecipeError

CASES = {
    "random": ({"method": "random", "seed": 5}, RandomDrop, 8),
    "tome": ({"method": "tome"}, ToMeMerge, 9),
    "oracle": ({"method": "oracle"}, OracleGuided, 9),
    "no-fusion": ({"fuse": False}, EvitReducer, 8),
}


def trained_start(tmp_path):
    """A tiny model's weights saved as the run's starting checkpoint (an oracle must be trained)."""
    path = tmp_path / "start.safetensors"
    save_weights(build_model(tiny_recipe(tmp_path).model), path)
    return {"checkpoint": str(path)}


@pytest.mark.parametrize("case", list(CASES))
def test_a_recipe_trains_and_rebuilds_its_reducer(tmp_path, case):
    options, reducer_type, image_tokens = CASES[case]
    recipe = tiny_recipe(tmp_path, {"reduction": options, "model": trained_start(tmp_path),
                                    "train": {"epochs": 1, "max_steps_per_epoch": 2}})
    run = loop.train(recipe, show_progress=False)
    model = rebuild(recipe, run / "model.safetensors")
    assert isinstance(model.evit_state.reducer, reducer_type)
    model(torch.randn(3, 1, 28, 28))
    assert int(kept_tokens(model)[0].token_of_patch.max()) + 1 == image_tokens  # 16 patches at keep 0.5


def test_the_oracle_defaults_to_the_starting_weights_and_stays_frozen(tmp_path):
    recipe = tiny_recipe(tmp_path, {"reduction": {"method": "oracle"}, "model": trained_start(tmp_path),
                                    "train": {"epochs": 1, "max_steps_per_epoch": 2}})
    _, tuned = loop.run_training(recipe, None, loop.distributed.Runtime(torch.device("cpu")), False)
    start = build_model(recipe.model).state_dict()
    oracle = tuned.evit_state.reducer.oracle.state_dict()
    assert all(torch.equal(oracle[key], start[key]) for key in start)
    assert any(not torch.equal(tuned.state_dict()[key], start[key]) for key in start)  # the student did train


def test_an_oracle_from_random_weights_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="oracle needs a trained oracle"):
        tiny_recipe(tmp_path, {"reduction": {"method": "oracle"}})
