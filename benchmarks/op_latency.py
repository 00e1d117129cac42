"""What a small tensor operation costs right after a transformer block, against back to back.

    python benchmarks/op_latency.py --repeats 61 --threads 2 --out benchmarks/results/op_latency_deit_s_cpu

Restoring the patch grid (docs/dense.md) and the training-free variant's merges
(docs/findings.md) add a few dozen small operations between the blocks of a batch-1
forward. Timed back to back they cost a few microseconds each; between blocks, each one
meets the caches a block's forward has just filled with its weights. This times each
operation of a restoration step right after one forward of a block of ``--model`` (random
weights, batch 1, on the sequence EViT keeps after its first reorganization at keep 0.7)
and right after the same operation (back to back), interleaved over ``--repeats``; the
medians, in microseconds. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F

from evit_patch.reducers.evit import kept_token_count
from evit_patch.tools.results import write_results
from evit_patch.tuning.timing import positive_int


def operations(tokens: int, kept: int, channels: int) -> dict[str, Callable[[], object]]:
    """The operations of one ``carry`` restoration step at batch 1 (``docs/dense.md``), by name:
    index work on the token map and the row copy and write of the full grid."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(tokens, channels, generator=generator)
    reduced = torch.randn(kept, channels, generator=generator)
    rows = torch.randperm(tokens, generator=generator)[:kept]
    kept_index = torch.randint(0, kept, (1, kept), generator=generator)
    own_rows = torch.arange(kept).view(1, kept)
    written = torch.cat([grid, reduced[:1]])

    def index_steps() -> object:  # a map step as restoration composes it
        composed = own_rows.gather(1, F.pad(kept_index, (0, 1), value=kept - 1))
        return torch.cat([own_rows[:, :1], composed[:, :-1]], dim=1).flatten()

    return {
        "one index gather": lambda: own_rows.gather(1, kept_index),
        "six index operations (a map step: pad, gather, two slices, cat, flatten)": index_steps,
        f"row copy of the {tokens} x {channels} grid (cat)": lambda: torch.cat([grid, reduced[:1]]),
        f"row write of {kept} tokens into it (index_put_)": lambda: written.index_put_((rows,), reduced),
        f"LayerNorm of {tokens} tokens": lambda: F.layer_norm(grid, (channels,)),
    }


def latencies(block: torch.nn.Module, block_input: torch.Tensor, timed: dict[str, Callable[[], object]],
              repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each operation ``after a block`` (one block forward just before it) and ``back
    to back`` (the same operation just before it), every repeat timing each once in both ways."""
    result = {name: {"after a block": [], "back to back": []} for name in timed}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            block(block_input)
            for operation in timed.values():
                operation()
        for _ in range(repeats):
            for name, operation in timed.items():
                block(block_input)
                start = time.perf_counter()
                operation()
                result[name]["after a block"].append(time.perf_counter() - start)
                operation()
                start = time.perf_counter()
                operation()
                result[name]["back to back"].append(time.perf_counter() - start)
    return result


def summary(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median microseconds in each way, and their ratio."""
    rows = {}
    for name, ways in times.items():
        after, warm = (statistics.median(ways[way]) * 1e6 for way in ("after a block", "back to back"))
        rows[name] = {"back_to_back_us": warm, "after_a_block_us": after, "ratio": after / warm}
    return rows


def markdown(rows: dict[str, dict[str, float]], setup: dict) -> str:
    lines = [f"{setup['model']} block (random weights), batch 1, {setup['kept_tokens']} tokens in the block, "
             f"cpu ({setup['threads']} threads); median of {setup['repeats']} interleaved repeats, microseconds",
             "", "| operation | back to back | right after a block | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {row['back_to_back_us']:.1f} | {row['after_a_block_us']:.1f} | {row['ratio']:.1f}x |"
              for name, row in rows.items()]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON keyword arguments of the model")
    parser.add_argument("--repeats", type=positive_int, default=61)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, **args.model_kwargs).eval()
    prefix, patches, channels = model.num_prefix_tokens, model.patch_embed.num_patches, model.embed_dim
    kept = prefix + kept_token_count(patches, 0.7) + 1  # EViT's sequence after its first layer at keep 0.7
    timed = operations(prefix + patches, kept, channels)
    rows = summary(latencies(model.blocks[len(model.blocks) // 2], torch.randn(1, kept, channels), timed, args.repeats))
    setup = {"model": args.model, "model_kwargs": args.model_kwargs, "kept_tokens": kept, "repeats": args.repeats,
             "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__}
    table = markdown(rows, setup)
    print(table)
    if args.out:
        write_results(args.out, table, {"setup": setup, "results": rows})
    return rows


if __name__ == "__main__":
    main()
