"""EViT token reorganization for timm Vision Transformers.

>>> import timm, evit_patch
>>> model = timm.create_model("deit_small_patch16_224")
>>> evit_patch.apply_evit(model, layers=[3, 6, 9], keep_rate=0.7)
"""

import evit_patch.models  # noqa: F401  (registers lvvit_* in timm's registry)
from evit_patch.budget import keep_rate_for_budget, keep_rate_for_resolution
from evit_patch.errors import UnsupportedModelError
from evit_patch.macs import count_macs
from evit_patch.patch import apply_evit, apply_token_reducer, is_patched, remove_evit, set_keep_rate
from evit_patch.provenance import DROPPED, FUSED, KEPT, LayerTokens, kept_tokens

__all__ = [
    "apply_evit",
    "apply_token_reducer",
    "remove_evit",
    "set_keep_rate",
    "is_patched",
    "count_macs",
    "keep_rate_for_budget",
    "keep_rate_for_resolution",
    "kept_tokens",
    "LayerTokens",
    "KEPT",
    "FUSED",
    "DROPPED",
    "UnsupportedModelError",
]
