"""DynamicViT's optimization: predictors at the full learning rate, the pretrained
backbone at a small fraction of it, and the backbone frozen for the first epochs so
the predictors learn against the features they were trained for."""

from __future__ import annotations

from torch import nn

from evit_patch.dynamicvit.patch import predictors


def _predictor_parameter_ids(model: nn.Module) -> set[int]:
    return {id(parameter) for parameter in predictors(model).parameters()}


def dynamicvit_param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float = 0.01) -> list[dict]:
    """Optimizer parameter groups: predictors (first) and backbone, each with and without weight
    decay (biases, norms and ``model.no_weight_decay()`` names without, as timm does).

    Backbone groups carry ``lr_scale = backbone_lr_scale``, the per-group multiplier timm's
    schedulers apply to the scheduled rate at every update; frozen parameters are
    included, so the groups can be built before :func:`set_backbone_frozen`.
    """
    if backbone_lr_scale < 0:
        raise ValueError(f"backbone_lr_scale must be >= 0 (fraction of the predictor learning rate), "
                         f"got {backbone_lr_scale!r}")
    in_predictor = _predictor_parameter_ids(model)
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], dict] = {}
    for name, parameter in model.named_parameters():
        is_predictor = id(parameter) in in_predictor
        decays = not (parameter.ndim <= 1 or name.endswith(".bias") or name in no_decay)
        group = groups.setdefault((is_predictor, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": 1.0 if is_predictor else backbone_lr_scale,
        })
        group["params"].append(parameter)
    return [group for _, group in sorted(groups.items(), key=lambda item: not item[0][0])]


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Stop (or restart) gradients to every parameter outside the predictors."""
    in_predictor = _predictor_parameter_ids(model)
    for parameter in model.parameters():
        if id(parameter) not in in_predictor:
            parameter.requires_grad_(not frozen)
