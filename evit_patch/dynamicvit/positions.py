"""Block inputs sized to the image-token sequence (a rotary table) at DynamicViT's inference.

Training keeps the sequence whole (dropped tokens are masked out of attention), so every
block takes the full table as the model made it. Inference removes tokens before each stage
block; each block from the first stage on then takes the rows of the image tokens it holds:
the last stage's ``kept_indices``, which already name original image tokens (prefix tokens
are not in the table and keep theirs).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from evit_patch.core.positions import SequenceInput
from evit_patch.dynamicvit.stages import StageSettings


class FollowingPositions:
    """Forward pre-hook of a block from the first stage on (after the stage's pruner): at
    inference, its inputs named in ``inputs``, passed by keyword or in their place (``places``),
    are swapped for the rows of the kept tokens; gathered once per stage and forward."""

    def __init__(self, state: StageSettings, inputs: dict[str, SequenceInput], places: dict[str, int]) -> None:
        self.state, self.inputs, self.places = state, inputs, places

    def __call__(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[tuple[tuple, dict]]:
        kept = self.state.record.kept_indices
        if block.training or not kept:
            return None
        args, kwargs = list(args), dict(kwargs)
        for name, follow in self.inputs.items():
            place = self.places.get(name, len(args))
            if place < len(args):
                args[place] = self._rows(name, follow, args[place], kept)
            elif name in kwargs:
                kwargs[name] = self._rows(name, follow, kwargs[name], kept)
        return tuple(args), kwargs

    def _rows(self, name: str, follow: SequenceInput, table: Optional[Tensor], kept: list[Tensor]) -> Optional[Tensor]:
        if table is None:
            return None
        followed = self.state.record.followed
        cached = followed.get((len(kept), name))
        if cached is None or cached[0] is not table:
            cached = followed[(len(kept), name)] = (table, follow.follow(table, kept[-1]))
        return cached[1]
