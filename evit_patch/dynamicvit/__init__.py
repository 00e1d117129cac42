"""DynamicViT (Rao et al., NeurIPS 2021): learned token pruning as a patch of timm ViTs.

>>> import timm
>>> from evit_patch.dynamicvit import apply_dynamicvit
>>> model = apply_dynamicvit(timm.create_model("deit_small_patch16_224"), layers=(3, 6, 9), keep_rate=0.7)
"""

from evit_patch.dynamicvit.loss import DynamicViTLoss, ratio_loss, token_distillation_loss
from evit_patch.dynamicvit.optim import dynamicvit_param_groups, set_backbone_frozen
from evit_patch.dynamicvit.patch import (
    apply_dynamicvit,
    dynamicvit_extra_parameters,
    dynamicvit_state,
    is_dynamicvit,
    remove_dynamicvit,
    unpruned_copy,
)

__all__ = [
    "apply_dynamicvit",
    "remove_dynamicvit",
    "is_dynamicvit",
    "dynamicvit_state",
    "dynamicvit_extra_parameters",
    "unpruned_copy",
    "DynamicViTLoss",
    "ratio_loss",
    "token_distillation_loss",
    "dynamicvit_param_groups",
    "set_backbone_frozen",
]
