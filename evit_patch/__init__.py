"""EViT token reorganization for timm Vision Transformers.

>>> import timm, evit_patch
>>> model = timm.create_model("deit_small_patch16_224")
>>> evit_patch.apply_evit(model, layers=[3, 6, 9], keep_rate=0.7)

The package is layered: ``core`` (the patch mechanism) at the bottom; the methods
(``reducers``, ``dynamicvit``, ``width_pruning``, ``cost``, ``models``) above it;
``train`` (recipes and the fine-tuning loop) above those; ``tools`` (command lines) on
top. Importing this package loads the mechanism, the methods and LV-ViT's timm
registration, and the tuner (``tuning``: measuring settings and choosing one), never the
training code.
"""

import evit_patch.adapters  # noqa: F401  (registers the transformers, open_clip and gemma4 families)
import evit_patch.models  # noqa: F401  (registers lvvit_* in timm's registry)
from evit_patch.core.dense import dense_outputs, restore_tokens, set_restoration
from evit_patch.core.lifecycle import is_patched
from evit_patch.core.provenance import DROPPED, FUSED, KEPT, LayerTokens, kept_tokens
from evit_patch.core.restoration import FILLS
from evit_patch.core.token_patch import apply_token_reducer, remove_evit, set_keep_rate, set_position_rule
from evit_patch.cost import count_macs, keep_rate_for_budget, keep_rate_for_resolution
from evit_patch.errors import UnsupportedModelError
from evit_patch.reducers.evit import apply_evit
from evit_patch.tuning.config import TokenConfig, apply_config
from evit_patch.tuning.front import UnreachableTarget
from evit_patch.tuning.result import TargetNotMet, TuneResult
from evit_patch.tuning.search import tune

__all__ = [
    "apply_evit",
    "apply_token_reducer",
    "remove_evit",
    "set_keep_rate",
    "set_position_rule",
    "is_patched",
    "count_macs",
    "keep_rate_for_budget",
    "keep_rate_for_resolution",
    "kept_tokens",
    "restore_tokens",
    "dense_outputs",
    "set_restoration",
    "FILLS",
    "LayerTokens",
    "KEPT",
    "FUSED",
    "DROPPED",
    "UnsupportedModelError",
    "tune",
    "TargetNotMet",
    "TuneResult",
    "TokenConfig",
    "apply_config",
    "UnreachableTarget",
]
