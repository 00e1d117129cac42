"""Every token method compiles into one graph: no graph break, ``fullgraph=True`` works,
and the compiled model computes what the eager one does, with the same token counts.

Graph breaks and host syncs are what make a token method slower than the model it patches
at small batch on a GPU, and CUDA graphs need one graph. Dynamo's own count of breaks is
read (``torch._dynamo.explain``); the compiled runs use the ``aot_eager`` backend (the whole
capture and functionalization, without C++ code generation), and inductor once.
"""

from __future__ import annotations

import pytest
import torch
from every_method import PATCHES, images, patched

import evit_patch
from evit_patch.dynamicvit import is_dynamicvit


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("method", "model_kind"), [(method, kind) for kind in ("vit", "rotary") for method in PATCHES] +
                         [("evit", "bias"), ("tome", "bias")])
def test_no_graph_break(method, model_kind, training):
    model = patched(method, model_kind).train(training)
    explanation = torch._dynamo.explain(model)(images(2, seed=0))
    assert explanation.graph_break_count == 0, [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def _token_counts(model: torch.nn.Module) -> list[int]:
    return [] if is_dynamicvit(model) else [layer.kept_index.shape[1] for layer in evit_patch.kept_tokens(model)]


@pytest.mark.parametrize(("method", "model_kind"), [(method, "vit") for method in PATCHES] +
                         [(method, "rotary") for method in ("evit", "tome", "dynamicvit")] +
                         [(method, "bias") for method in ("evit", "tome")])
def test_fullgraph_compile_matches_eager(method, model_kind):
    model = patched(method, model_kind)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for batch in (1, 3):
            expected = model(images(batch, seed=batch))
            counts = _token_counts(model)
            torch.testing.assert_close(compiled(images(batch, seed=batch)), expected, rtol=1e-5, atol=1e-6)
            assert _token_counts(model) == counts  # static for a given input size and keep rate


def test_inductor_compiles_the_absorbing_merge():
    """The merge whose shapes were data-dependent (``bincount``, ``nonzero``), through inductor."""
    model = patched("training-free-absorbing")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images(2, seed=0)), model(images(2, seed=0)), rtol=1e-4, atol=1e-5)
