"""Every ViT-like model in timm's registry either patches and runs, or is refused with
UnsupportedModelError, never any other exception. Models are built small (2 blocks,
narrow, 112 px) so the whole registry runs in CI."""

import pytest
import timm
import torch

import evit_patch
from evit_patch import UnsupportedModelError
from evit_patch.core.model_info import native_input_shape

VIT_LIKE = ["vit_*", "deit*", "flexivit*", "eva*", "beit*", "cait*", "xcit*", "levit*", "volo*"]
SMALL_BUILDS = [
    {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 112},
    {"depth": 2, "img_size": 112},
    {"depth": 2},
    {},  # families whose entrypoints fix their depth (levit, xcit, volo, cait): the smallest ones
]
MAX_PARAMETERS = 30_000_000  # larger stock models are skipped to keep CI short


def build_small(name: str) -> torch.nn.Module:
    for kwargs in SMALL_BUILDS:
        try:
            with torch.device("meta"):  # size it without allocating
                sized = timm.create_model(name, **kwargs)
        except Exception:  # this size is not one the entrypoint accepts; try the next
            continue
        if sum(p.numel() for p in sized.parameters()) <= MAX_PARAMETERS:
            return timm.create_model(name, **kwargs).eval()
    pytest.skip(f"{name} cannot be built small enough for CI")


@pytest.mark.parametrize("name", timm.list_models(VIT_LIKE))
def test_registry_model_patches_and_runs_or_is_refused(name: str) -> None:
    torch.manual_seed(0)
    model = build_small(name)
    try:
        evit_patch.apply_evit(model, [1], 0.5)
    except UnsupportedModelError as error:
        assert error.reason and name.split("_")[0] in str(error) or type(model).__name__ in str(error)
        assert not evit_patch.is_patched(model)
        return
    shape = native_input_shape(model)
    with torch.no_grad():
        logits = model(torch.randn(2, *shape))
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    (layer,) = evit_patch.kept_tokens(model)
    assert layer.kept_index.shape[1] < layer.token_of_patch.shape[1]
