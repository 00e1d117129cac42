"""Where a recipe's model comes from: a timm name with hub weights, a local file, or a checkpoint."""

from __future__ import annotations

import timm
from torch import nn

from evit_patch.train.checkpoint import load_weights
from evit_patch.train.recipe import ModelConfig, TeacherConfig
from evit_patch.train.transformers_source import build_transformers_model


def build_model(config: ModelConfig | TeacherConfig) -> nn.Module:
    """A timm model with hub weights (``pretrained``), hub-format weights from a local file
    (``pretrained_file``, adapted by timm to the model's size), and/or an exact state_dict;
    or a transformers image classifier (``source: transformers``)."""
    if getattr(config, "source", "timm") == "transformers":
        model = build_transformers_model(config.name, config.kwargs)
        if config.checkpoint:
            load_weights(model, config.checkpoint)
        return model
    overlay = {"pretrained_cfg_overlay": {"file": config.pretrained_file}} if config.pretrained_file else {}
    pretrained = config.pretrained or bool(config.pretrained_file)
    model = timm.create_model(config.name, pretrained=pretrained, **overlay, **config.kwargs)
    if config.checkpoint:
        load_weights(model, config.checkpoint)
    return model
