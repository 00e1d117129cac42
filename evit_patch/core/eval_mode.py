"""Temporary evaluation mode that restores every module's own flag afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then each module's previous ``training`` flag back
    (a plain ``model.train()`` afterwards would switch on modules the user had frozen)."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training
