"""A recipe's model from Hugging Face transformers (``model.source: transformers``).

``model.name`` is a local checkpoint folder (``save_pretrained``'s ``config.json`` and
weights, loaded with ``from_pretrained``) or a model type (``vit``, ``deit``, ``dinov2``,
``dinov2_with_registers``) built from ``model.kwargs`` as its config, with random weights.
Either way the model is an image classifier (``AutoModelForImageClassification``): the
training loop reads its ``.logits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from evit_patch.extras import require
from evit_patch.train.messages import one_line


def _transformers() -> Any:
    return require("transformers", "transformers")


def _folder(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _one_line(error: Exception) -> str:
    return one_line(f"{type(error).__name__}: {error}")[:200]


def transformers_config(name: str, kwargs: dict[str, Any]) -> Any:
    """The config of the model a recipe names; ``ValueError`` starting with the key at fault."""
    transformers = _transformers()
    folder = _folder(name)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise ValueError(f"name: folder {name!r} holds no config.json; save the model there with "
                             "save_pretrained(folder)")
        try:
            return transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
        except Exception as error:  # transformers raises many kinds of errors on a bad folder
            raise ValueError(f"name: transformers cannot read the config in {name!r} ({_one_line(error)})") from None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if name not in CONFIG_MAPPING:
        raise ValueError(f"name: {name!r} is neither a checkpoint folder nor a transformers model type "
                         "(e.g. 'vit', 'deit', 'dinov2', 'dinov2_with_registers')")
    try:
        return transformers.AutoConfig.for_model(name, **kwargs)
    except Exception as error:  # transformers raises many kinds of errors on a bad config
        raise ValueError(f"kwargs: transformers cannot make a {name!r} config of {kwargs!r} ({_one_line(error)})") from None


def build_transformers_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The image classifier a recipe names: from its checkpoint folder, or of a model type
    with random weights."""
    transformers = _transformers()
    config = transformers_config(name, kwargs)
    folder = _folder(name)
    if folder is not None:
        return transformers.AutoModelForImageClassification.from_pretrained(str(folder), config=config)
    return transformers.AutoModelForImageClassification.from_config(config)


def logits_of(outputs: Any) -> Any:
    """The logits of a model's outputs: transformers' ``.logits``, or the outputs themselves (timm)."""
    logits = getattr(outputs, "logits", None)
    return outputs if logits is None else logits


def class_count(model: nn.Module) -> int:
    """The number of classes a model predicts: timm's ``num_classes`` or transformers' ``config.num_labels``."""
    count = getattr(model, "num_classes", None)
    return int(count if count is not None else model.config.num_labels)
