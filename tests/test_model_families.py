"""Model families: timm is the default, adapters claim their library's models, and the
plain package imports neither optional library."""

import subprocess
import sys

import timm
import torch

import evit_patch
from evit_patch.adapters import OPEN_CLIP, TRANSFORMERS
from evit_patch.core.model_info import TIMM, ModelFamily, family_of, register_family, transformer_blocks


def test_import_evit_patch_loads_no_optional_library() -> None:
    code = "import sys, evit_patch\nprint(sorted(m for m in ('transformers', 'open_clip') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_timm_models_and_plain_modules_belong_to_the_timm_family() -> None:
    assert family_of(timm.create_model("vit_tiny_patch16_224", depth=2)) is TIMM
    assert family_of(torch.nn.Linear(2, 2)) is TIMM
    assert TRANSFORMERS.name == "transformers" and OPEN_CLIP.name == "open_clip"


def test_a_registered_family_claims_its_models_first() -> None:
    """A family is one small class: here, a model keeping its blocks under another name."""

    class Renamed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    class RenamedFamily(ModelFamily):
        name = "renamed"

        def matches(self, model: torch.nn.Module) -> bool:
            return isinstance(model, Renamed)

        def blocks(self, model):
            return model.inner.blocks

        def prefix_token_count(self, model) -> int:
            return 1

        def score_mode(self, model):
            return "class"

        def native_input_shape(self, model):
            return (3, 32, 32)

        def patch_count(self, model):
            return 16

    family = RenamedFamily()
    register_family(family)
    try:
        model = Renamed().eval()
        assert family_of(model) is family and family_of(model.inner) is TIMM
        evit_patch.apply_evit(model, [1], 0.5)
        assert transformer_blocks(model)[1].__class__.__name__ == "ReorganizingBlock"
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
        assert evit_patch.kept_tokens(model)[0].kept_index.shape == (1, 8)
    finally:
        from evit_patch.core import model_info
        model_info._FAMILIES.remove(family)
