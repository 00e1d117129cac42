"""Pickled and deep-copied clones of a patched model, as servers and checkpoints make them."""

from __future__ import annotations

import copy
import pickle

import torch
from torch import nn

import evit_patch


def pickled_and_copied(model: nn.Module, images: torch.Tensor) -> list[nn.Module]:
    """A pickled and a deep-copied clone of patched ``model``, each checked to give exactly its
    outputs on ``images`` and then unpatched with ``remove_evit`` (the caller checks what that left)."""
    with torch.no_grad():
        expected = model(images)
        clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
        for clone in clones:
            assert torch.equal(clone(images), expected)
            evit_patch.remove_evit(clone)
    return clones
