"""The settings the tuner tries: methods x keep rates x placements x per-block rates x per-block
prune or pool, the paper's own points first (a search cut short by its time budget has them)."""

from __future__ import annotations

from typing import Sequence

from evit_patch.core.arguments import paper_layers
from evit_patch.tuning.config import TokenConfig

TUNED_METHODS = ("evit", "evit-training-free", "tome")
"""Paper EViT (for a model to be fine-tuned), the training-free variant, ToMe-style merging."""
LOWEST_RATE = {"tome": 0.5}
"""Keep rates below which a method cannot go: bipartite matching merges at most half the tokens."""
KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5)
RATE_SHAPES = {"uniform": (1.0, 1.0), "front-loaded": (1.5, 0.5), "back-loaded": (0.5, 1.5)}
"""How the paper's total reduction is spread over the blocks: each block's share of it goes
linearly from the first value to the second (front-loaded prunes most in the first block,
which saves the most MACs and risks the most agreement)."""
POOLINGS = {"pool": "always", "absorb": "never", "pool-then-absorb": ("always", "never"),
            "absorb-then-pool": ("never", "always")}
"""The training-free variant's prune-or-pool per block: pooling everywhere it can, absorbing
everywhere, or the first block one way and the later blocks the other."""


def placements(depth: int) -> dict[str, tuple[int, ...]]:
    """The paper's blocks for ``depth`` (DeiT's 12: 3, 6, 9), each one block earlier, each one
    later, every other block from block 1, and one block more than the paper's in a row from the
    earlier placement's first (DeiT's 12: 2, 3, 4, 5): the same reduction made sooner and more
    gently, which on the 6-block Fashion-MNIST base kept the answers best at a given MAC ratio
    (docs/measured.md). A placement equal to an earlier one is left out."""
    paper = tuple(paper_layers(depth))
    earlier = tuple(sorted({max(0, layer - 1) for layer in paper}))
    in_a_row = tuple(range(earlier[0], min(depth, earlier[0] + len(paper) + 1))) if paper else ()
    found: dict[str, tuple[int, ...]] = {}
    for name, layers in (("paper", paper), ("earlier", earlier),
                         ("later", tuple(sorted({min(depth - 1, layer + 1) for layer in paper}))),
                         ("every other", tuple(range(1, depth, 2))), ("in a row", in_a_row)):
        if layers and layers not in found.values():
            found[name] = layers
    return found


def block_rates(keep_rate: float, blocks: int, paper_blocks: int, shape: tuple[float, float]) -> tuple[float, ...]:
    """A keep rate per block that leaves as many tokens after the last block as the paper's
    ``paper_blocks`` blocks at ``keep_rate`` each (``keep_rate ** paper_blocks``), the
    reduction shared out by ``shape`` (:data:`RATE_SHAPES`)."""
    first, last = shape
    steps = [first + (last - first) * index / max(blocks - 1, 1) for index in range(blocks)]
    scale = paper_blocks / sum(steps)
    return tuple(round(min(1.0, keep_rate ** (step * scale)), 4) for step in steps)


def _poolings(choice: str | tuple[str, str], blocks: int) -> str | tuple[str, ...]:
    """A :data:`POOLINGS` value for ``blocks`` blocks: the first block's choice, then the rest's."""
    return choice if isinstance(choice, str) else (choice[0],) + (choice[1],) * (blocks - 1)


def candidate_configs(depth: int, methods: Sequence[str] = TUNED_METHODS,
                      keep_rates: Sequence[float] = KEEP_RATES) -> list[TokenConfig]:
    """Every setting to try on a model of ``depth`` blocks, in order of how far it departs from
    the paper: its placement at one rate per block first, then other rate shapes, other
    placements, and the training-free variant's per-block prune-or-pool."""
    layouts = placements(depth)
    paper = layouts["paper"]
    shaped = [(paper, shape) for name, shape in RATE_SHAPES.items() if name != "uniform" and len(paper) > 1]
    moved = [(layers, RATE_SHAPES["uniform"]) for name, layers in layouts.items() if name != "paper"]
    found: list[TokenConfig] = []

    def add(method: str, layers: tuple[int, ...], rate: float, shape: tuple[float, float], pooling: object = None) -> None:
        options = () if pooling is None else (("pooling", _poolings(pooling, len(layers))),)
        config = TokenConfig(method, layers, block_rates(rate, len(layers), len(paper), shape), options)
        if config not in found and min(config.keep_rates) >= LOWEST_RATE.get(method, 0.0):
            found.append(config)

    for layers, shape in [(paper, RATE_SHAPES["uniform"])] + shaped + moved:
        for rate in keep_rates:
            for method in methods:
                add(method, layers, rate, shape, "always" if method == "evit-training-free" else None)
    if "evit-training-free" in methods:
        for name, pooling in POOLINGS.items():
            for rate in keep_rates:
                if name != "pool" and (len(paper) > 1 or isinstance(pooling, str)):
                    add("evit-training-free", paper, rate, RATE_SHAPES["uniform"], pooling)
    return found
