"""Adapters: ViT families of other libraries, and timm towers laid out unlike timm's ViTs (Gemma 4),
registered so that the same one-line patch works on them (see
:class:`evit_patch.core.model_info.ModelFamily`; timm is the default).

Importing this package imports neither library: a family claims a model by the module
its class comes from.
"""

from evit_patch.adapters.open_clip_vit import OPEN_CLIP
from evit_patch.adapters.timm_gemma4 import GEMMA4
from evit_patch.adapters.transformers_vit import TRANSFORMERS
from evit_patch.core.model_info import register_family

register_family(TRANSFORMERS)
register_family(OPEN_CLIP)
register_family(GEMMA4)

__all__ = ["TRANSFORMERS", "OPEN_CLIP", "GEMMA4"]
