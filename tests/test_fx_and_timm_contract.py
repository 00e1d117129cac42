"""A patched model where timm's own model tests and feature extractors take it: torch.fx traces
(symbolic_trace, timm's and torchvision's create_feature_extractor) equal the eager model forward
and backward, forward_intermediates keeps timm's contract, the model pickles, and TorchScript is
refused in one line. Our own tests of timm's contracts, on small models of every accepted family."""

from __future__ import annotations

import copy
import pickle
from typing import Callable

import pytest
import timm
import torch
import torch.fx
from test_model_zoo import FAMILIES
from timm.models import create_feature_extractor as timm_feature_extractor
from timm.models import get_graph_node_names
from torchvision.models.feature_extraction import create_feature_extractor

import evit_patch
from evit_patch.reducers import EvitReducer, RandomDrop, ToMeMerge

LAYERS = [1, 2]
REDUCERS = {
    "evit": lambda model: evit_patch.apply_evit(model, LAYERS, 0.5),
    "evit-no-fusion": lambda model: evit_patch.apply_token_reducer(model, LAYERS, 0.5, EvitReducer(fuse=False)),
    "random": lambda model: evit_patch.apply_token_reducer(model, LAYERS, 0.5, RandomDrop(seed=3)),
    "tome": lambda model: evit_patch.apply_token_reducer(model, LAYERS, 0.5, ToMeMerge()),
    "training-free": lambda model: evit_patch.apply_evit(model, LAYERS, 0.5, variant="training-free"),
}


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2,
                             num_classes=5)


def images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reseed(patched: torch.nn.Module) -> None:
    """Random drop's count of training draws back to 0: the next forward draws what the last one did."""
    reducer = patched.evit_state.reducer
    if isinstance(reducer, RandomDrop):
        reducer.training_draws.zero_()


def run(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, patched: torch.nn.Module | None = None
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output, and gradients of the patched model's parameters, of one forward and backward of ``model``
    (the patched model, or a trace of ``patched``, which shares its parameters), random drop reseeded."""
    patched = patched or model
    reseed(patched)
    patched.zero_grad()
    output = model(x)
    output.square().mean().backward()
    return output.detach(), {name: parameter.grad.clone() for name, parameter in patched.named_parameters()}


@pytest.mark.parametrize("reducer", REDUCERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_symbolic_trace_equals_the_patched_model(reducer: str, mode: str) -> None:
    model = REDUCERS[reducer](tiny_vit()).train(mode == "train")
    traced = torch.fx.symbolic_trace(model)
    for x in (images(3), images(2, seed=2), images(3, seed=3)):  # every forward starts afresh in the graph too
        expected, expected_gradients = run(model, x)
        output, gradients = run(traced, x, model)
        assert torch.equal(output, expected)
        assert gradients.keys() == expected_gradients.keys()
        assert all(torch.equal(gradients[name], expected_gradients[name]) for name in gradients)
    assert [record.kept_index.shape[0] for record in evit_patch.kept_tokens(model)] == [3, 3]


def test_a_traced_model_refuses_a_mask_given_at_run_time() -> None:
    """timm's forward takes ``attn_mask``; the trace makes it an input, which the reorganizer checks at run time."""
    model = evit_patch.apply_evit(tiny_vit().eval(), LAYERS, 0.5)
    traced = torch.fx.symbolic_trace(model)
    x = images()
    assert torch.equal(traced(x), model(x))
    for masks in ({"attn_mask": torch.zeros(17, 17)}, {"is_causal": True}):
        with pytest.raises(ValueError, match="shortens the token sequence, so attn_mask / is_causal cannot be applied"):
            traced(x, **masks)


@pytest.mark.parametrize("reducer", ["evit", "tome"])
def test_feature_extractors_take_block_outputs(reducer: str) -> None:
    model = REDUCERS[reducer](tiny_vit()).eval()
    x = images()
    outputs = {}
    model.blocks[3].register_forward_hook(lambda module, args, output: outputs.setdefault("block", output))
    logits = model(x)
    nodes = {"blocks.3": "block", "head": "logits"}
    for extractor in (create_feature_extractor, timm_feature_extractor):  # torchvision's: only torch.nn leaves
        features = extractor(model, nodes)(x)
        assert torch.equal(features["logits"], logits) and torch.equal(features["block"], outputs["block"])
    assert outputs["block"].shape[1] < 17


@pytest.mark.parametrize("reducer", REDUCERS)
def test_pickle_round_trip_and_removal(reducer: str) -> None:
    base = tiny_vit().eval()
    model = REDUCERS[reducer](copy.deepcopy(base))
    x = images()
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(run(restored, x)[0], run(model, x)[0])
    reseed(restored)
    final, intermediates = restored.forward_intermediates(x, indices=[3])
    reseed(restored)
    assert torch.equal(final, restored.forward_features(x)) and intermediates[0].shape[-2:] == (4, 4)
    evit_patch.remove_evit(restored)
    assert "forward_intermediates" not in vars(restored)
    assert torch.equal(restored(x), base(x))
    assert list(restored.state_dict()) == list(base.state_dict())


def test_torchscript_is_refused_in_one_line() -> None:
    model = evit_patch.apply_evit(tiny_vit().eval(), LAYERS, 0.5)
    with pytest.raises(RuntimeError, match=r"^torch.jit.script cannot .*use torch.compile or torch.export, or "
                                           r"remove_evit\(model\) first$"):
        torch.jit.script(model)
    evit_patch.remove_evit(model)
    torch.jit.script(model)  # timm's ViT itself scripts


def family_model(name: str) -> torch.nn.Module:
    family = FAMILIES[name]
    torch.manual_seed(0)
    return timm.create_model(family.model, **family.build, num_classes=4)


def family_images(model: torch.nn.Module) -> torch.Tensor:
    size = getattr(getattr(model, "patch_embed", None), "img_size", (64, 64))
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def timm_fx_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """timm's FX feature extractor of the model's output (the last node of its training graph), or None
    where the unpatched model does not trace (NaFlexViT; timm's own FX tests skip such models too)."""
    try:
        return timm_feature_extractor(model, {get_graph_node_names(model)[0][-1]: "out"})
    except Exception:  # torch.fx raises many kinds of errors on untraceable code
        return None


@pytest.mark.parametrize("keep_rate", [1.0, 0.7])
@pytest.mark.parametrize("family", FAMILIES)
def test_timm_model_contracts_on_patched_families(family: str, keep_rate: float) -> None:
    """timm's model tests, ours: forward, backward (every parameter a gradient), forward_intermediates
    (intermediates of the unpatched shapes, final output that of forward_features), FX forward and backward."""
    base = family_model(family).train()
    x = family_images(base)
    model = evit_patch.apply_evit(copy.deepcopy(base), LAYERS, keep_rate).train()
    output, gradients = run(model, x)
    assert output.shape == base(x).shape
    assert all(gradient is not None for gradient in gradients.values())
    assert set(gradients) == {name for name, _ in base.named_parameters()}

    model.eval()
    final, intermediates = model.forward_intermediates(x)
    _, expected = base.eval().forward_intermediates(x)
    assert [tuple(grid.shape) for grid in intermediates] == [tuple(grid.shape) for grid in expected]
    if family.startswith("cait"):  # the class token joins after the blocks, by a cat no hook reaches
        assert torch.equal(model.forward_head(final), model(x))
    else:
        assert torch.equal(final, model.forward_features(x))

    if timm_fx_model(base) is not None:
        model.train()
        traced = timm_fx_model(model)
        expected_output, expected_gradients = run(model, x)
        traced_output, traced_gradients = run(lambda images: traced(images)["out"], x, model)
        assert torch.equal(traced_output, expected_output)
        assert all(torch.equal(traced_gradients[name], expected_gradients[name]) for name in expected_gradients)
