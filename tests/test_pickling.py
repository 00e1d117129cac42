"""A patched model travels whole: ``torch.save`` / ``torch.load``, ``pickle`` and a worker
process started with ``spawn`` get a model that computes what the original does, and from
which ``remove_evit`` still takes the patch off exactly.

Whatever sends a model to another process (multiprocessing, Ray, a model registry) pickles
it; a load that fails, or that brings back a model computing something else, is the bug.
"""

from __future__ import annotations

import copy
import io
import multiprocessing
import pickle

import pytest
import torch
from every_method import KEEP_RATE, LAYERS, PATCHES, images, patched, small_bias_vit, small_vit

import evit_patch
from evit_patch.reducers import OracleGuided

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")


def _saved_and_loaded(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"torch.save": _saved_and_loaded, "pickle": lambda model: pickle.loads(pickle.dumps(model))}


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        output = model(x)
    output = output if isinstance(output, (tuple, list)) else [output]
    return [getattr(item, "last_hidden_state", item) for item in output]


def _assert_same(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _transformers_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, image_size=32,
                                    patch_size=8, intermediate_size=96)
    return transformers.ViTModel(config).eval()


def _open_clip_tower() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(layers=4, width=48, head_width=16, mlp_ratio=2.0, patch_size=8,
                                           image_size=32)
    return open_clip.model._build_vision_tower(16, vision).eval()


def _check_round_trip(model: torch.nn.Module, base: torch.nn.Module, round_trip) -> None:
    x = images(3, seed=5)
    expected = _outputs(model, x)
    restored = round_trip(model)
    _assert_same(_outputs(restored, x), expected)
    assert evit_patch.is_patched(restored)
    evit_patch.remove_evit(restored)
    _assert_same(_outputs(restored, x), _outputs(base, x))  # bitwise the unpatched model
    assert restored.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("method", list(PATCHES))
def test_every_method_survives_a_round_trip(method, round_trip):
    model = patched(method)
    _check_round_trip(model, small_vit(), ROUND_TRIPS[round_trip])


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("method", ["evit", "tome"])
def test_a_relative_bias_model_survives_a_round_trip(method, round_trip):
    """Each attention after the first layer follows its own bias (BEiT): through the rewritten
    blocks' scored attentions and the swapped attentions of the others."""
    _check_round_trip(patched(method, "bias"), small_bias_vit(), ROUND_TRIPS[round_trip])


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("method", ["evit", "evit-no-fusion", "random", "oracle"])
def test_open_clip_survives_a_round_trip(method, round_trip):
    """open_clip's towers (``nn.MultiheadAttention`` takes no key weights: the merging methods are refused)."""
    base = _open_clip_tower()
    model = copy.deepcopy(base)
    if method == "oracle":
        evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, OracleGuided(_open_clip_tower(), LAYERS))
    else:
        PATCHES[method](model)
    _check_round_trip(model, base, ROUND_TRIPS[round_trip])


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("method", ["evit", "evit-no-fusion", "random"])
def test_transformers_survives_a_round_trip(method, round_trip):
    """Outputs and every layer's hidden state after the round trip (asked for afterwards: a
    model that has recorded them holds transformers' local hooks, below)."""
    base = _transformers_vit()
    _check_round_trip(PATCHES[method](copy.deepcopy(base)), base, ROUND_TRIPS[round_trip])
    x = images(2, seed=4)
    restored = ROUND_TRIPS[round_trip](PATCHES[method](copy.deepcopy(base)))
    with torch.no_grad():
        expected = PATCHES[method](copy.deepcopy(base))(x, output_hidden_states=True).hidden_states
        hidden = restored(x, output_hidden_states=True).hidden_states
    assert len(hidden) == len(expected) == 5  # the embeddings and each of the 4 layers
    _assert_same(list(hidden), list(expected))


def test_transformers_pickles_as_transformers_allows():
    """transformers records ``hidden_states`` with hooks that are local functions, so a model of
    it that has recorded them does not pickle, patched or not; one that has not pickles patched
    too (a rewritten layer's hook is made on first use and left out of pickles)."""
    base = _transformers_vit()
    with torch.no_grad():
        base(images(1, seed=0), output_hidden_states=True)
    with pytest.raises(AttributeError, match="local object"):
        pickle.dumps(base)
    with pytest.raises(AttributeError, match="local object"):
        pickle.dumps(PATCHES["evit"](copy.deepcopy(base)))


def _forward_in_worker(model: torch.nn.Module, x: torch.Tensor, queue) -> None:
    with torch.no_grad():
        queue.put(model(x).numpy())  # a plain array: a tensor would go as a shared-memory handle that dies with the worker


def test_a_spawned_worker_gets_a_working_patched_model():
    model = patched("training-free")
    x = images(2, seed=3)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_forward_in_worker, args=(model, x, queue))
    worker.start()
    result = queue.get(timeout=120)
    worker.join(timeout=60)
    assert worker.exitcode == 0
    _assert_same([torch.from_numpy(result)], _outputs(model, x))
