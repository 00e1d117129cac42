"""Model families timm does not ship; importing this registers them with timm.

>>> import timm, evit_patch.models
>>> model = timm.create_model("lvvit_s")
"""

from evit_patch.models.lvvit import DEFAULT_EVIT_LAYERS, LvVit, lvvit_m, lvvit_s, lvvit_t
from evit_patch.models.lvvit_weights import load_lvvit_checkpoint

__all__ = ["LvVit", "lvvit_t", "lvvit_s", "lvvit_m", "DEFAULT_EVIT_LAYERS", "load_lvvit_checkpoint"]
