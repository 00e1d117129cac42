"""Adapters: ViT families of other libraries, registered so that the same one-line patch
works on them (see :class:`evit_patch.core.model_info.ModelFamily`; timm is the default).

Importing this package imports neither library: a family claims a model by the module
its class comes from.
"""

from evit_patch.adapters.open_clip_vit import OPEN_CLIP
from evit_patch.adapters.transformers_vit import TRANSFORMERS
from evit_patch.core.model_info import register_family

register_family(TRANSFORMERS)
register_family(OPEN_CLIP)

__all__ = ["TRANSFORMERS", "OPEN_CLIP"]
