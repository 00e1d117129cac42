"""What restoring the full grid costs of EViT's speed-up, timed side by side in one process.

    python benchmarks/dense_speed.py --batch-sizes 1 32 --repeats 15 --calls-per-repeat 2 --out benchmarks/results/dense_speed_deit_s_cpu

A dense consumer's call, ``forward_intermediates(x, indices, norm=True, output_fmt="NLC")``,
on the unpatched model and on EViT (keep 0.7, blocks 3, 6, 9) with each restoration fill,
beside the same timm code on EViT without restoration (the reduced sequences; NLC needs no
grid, so it runs): the speed-up there is the one to keep. Random weights of
``--model`` (DeiT-S by default); inference, fp32, every call timed interleaved in
rotating order (``evit_patch.tuning.timing``). The share of the speed-up restoration eats
is the time per image it adds to the reduced call over the time the reduced call saves
on the unpatched one, each a median of per-repeat differences (:func:`summary`).
Comparing whole forwards is noisy at batch 1 (a few per cent from one repeat to the
next), so the restoration's own tensor work is also replayed on the reduced model's block
outputs and timed in the same rotation ("restoration work alone"; its speed-up is the
unpatched time over the reduced time plus that work, per repeat). At batch 1 the same
replay runs once more with a block's forward before each of its steps, as in the real
call, and the blocks' own time is subtracted: what the work costs on the caches a block
leaves behind. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Callable, Optional

import timm
import torch

import evit_patch
from evit_patch.core.model_info import example_images
from evit_patch.core.reduction import TokenMap
from evit_patch.core.restoration import NEEDS_ENTERING_GRID, PatchPlaces, restore_sequence
from evit_patch.tools.results import write_results
from evit_patch.tuning.timing import interleaved_rates


def restoration_work(model: torch.nn.Module, images: torch.Tensor, indices: list[int],
                     before_each_step: Optional[Callable[[], object]] = None) -> Callable[[], object]:
    """The restoration's own tensor work in one ``forward_intermediates`` call, replayed on the
    block outputs the reduced model produced: each reduction layer's map followed, the blocks
    handed out restored (fill ``carry``: and the grid entering each reduction layer kept).
    Timed beside the forwards, it says what restoring costs without the noise of comparing
    two whole forwards. ``before_each_step`` (a block's forward) runs before each map step and
    each restoration, as a block does in the real call, so that the work meets the caches a
    block leaves behind rather than its own warm ones."""
    from timm.models._features import feature_take_indices

    state, blocks = model.evit_state, model.blocks
    first, prefix, fill = state.layers[0], state.num_prefix_tokens, state.restoration
    outputs: dict[int, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda _, args, output, i=i: outputs.__setitem__(i, output))
               for i, block in enumerate(blocks)]
    handles.append(blocks[first].register_forward_pre_hook(lambda _, args: outputs.__setitem__(first - 1, args[0])))
    with torch.inference_mode():
        type(model).forward_intermediates(model, images, indices=indices, output_fmt="NLC", intermediates_only=True)
    for handle in handles:
        handle.remove()
    records = list(state.records)
    positions = {index: position for position, index in enumerate(state.layers)}
    taken = {i for i in feature_take_indices(len(blocks), indices)[0] if i >= first} | {len(blocks) - 1}
    grid = tuple(model.patch_embed.grid_size)

    step = before_each_step or (lambda: None)

    def fresh(record: TokenMap) -> TokenMap:  # a forward's own map: its destination not yet derived
        return TokenMap.selection(record.kept_index, record.incoming, record.fused)

    def work() -> object:
        places = PatchPlaces.start(images.shape[0], outputs[first - 1].shape[1] - prefix, images.device, prefix)
        previous, restored = outputs[first - 1], None
        for i in range(first, len(blocks)):
            if i in positions:
                if fill in NEEDS_ENTERING_GRID and i != first:
                    if i - 1 in taken:
                        previous = restored
                    else:
                        step()
                        previous = restore_sequence(outputs[i - 1], places, prefix, fill, previous=previous,
                                                    grid_size=grid)
                step()
                places = places.after(fresh(records[positions[i]]))
            if i in taken:
                step()
                restored = restore_sequence(outputs[i], places, prefix, fill, previous=previous, grid_size=grid)
        return restored

    return work


def step_count(model: torch.nn.Module, images: torch.Tensor, indices: list[int]) -> int:
    """How many steps :func:`restoration_work` takes (how many blocks it runs between them)."""
    count = [0]
    restoration_work(model, images, indices, lambda: count.__setitem__(0, count[0] + 1))()
    return count[0]


def calls(model_name: str, keep_rate: float, layers: list[int], fills: list[str], indices: list[int],
          images: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed calls: ``name -> call``, the unpatched dense call first."""
    torch.manual_seed(0)
    base = timm.create_model(model_name).eval()
    patched = {fill: evit_patch.apply_evit(copy.deepcopy(base), layers, keep_rate) for fill in fills}
    for fill, model in patched.items():
        evit_patch.set_restoration(model, fill)
    reduced = next(iter(patched.values()))

    options = {"indices": indices, "norm": True, "output_fmt": "NLC", "intermediates_only": True}

    def dense(model: torch.nn.Module) -> Callable[[], object]:
        return lambda: model.forward_intermediates(images, **options)

    def without_restoration() -> object:  # timm's method itself, not the instance's restoring one
        return type(reduced).forward_intermediates(reduced, images, **options)

    with torch.inference_mode():
        tokens = reduced.forward_features(images)
    block = reduced.blocks[-1]

    def blocks(count: int) -> Callable[[], object]:
        return lambda: [block(tokens) for _ in range(count)]

    timed = {"unpatched": dense(base), f"EViT {keep_rate} reduced (no restoration)": without_restoration,
             **{f"EViT {keep_rate} restored ({fill})": dense(model) for fill, model in patched.items()},
             **{f"restoration work alone ({fill})": restoration_work(model, images, indices)
                for fill, model in patched.items()}}
    for fill, model in patched.items() if images.shape[0] == 1 else ():  # larger batches: the blocks' noise hides it
        steps = step_count(model, images, indices)
        timed[f"{COLD_PREFIX}({fill}){HELPER}"] = restoration_work(model, images, indices, lambda: block(tokens))
        timed[f"blocks alone ({fill}){HELPER}"] = blocks(steps)
    return timed


COLD_PREFIX = "restoration work alone, a block before each step "
"""Rows of the work replayed after a block forward each step, less the same blocks timed alone."""
HELPER = " [with the blocks]"


def cold_rates(rates: dict[str, list[float]], batch_size: int) -> dict[str, list[float]]:
    """The timed rates with each replay-after-blocks turned into the work's own rate (its time
    per call less that of the same blocks alone, repeat by repeat) and the helper rows dropped."""
    result = {name: values for name, values in rates.items() if not name.endswith(HELPER)}
    for name, values in rates.items():
        if name.startswith(COLD_PREFIX):
            fill = name[len(COLD_PREFIX):].removesuffix(HELPER)
            alone = rates[f"blocks alone {fill}{HELPER}"]
            result[name.removesuffix(HELPER)] = [batch_size / max(batch_size / with_blocks - batch_size / blocks, 1e-9)
                                                 for with_blocks, blocks in zip(values, alone)]
    return result


def measure(args: argparse.Namespace, batch_size: int) -> dict[str, list[float]]:
    images = example_images(timm.create_model(args.model), batch_size, seed=0)
    timed = calls(args.model, args.keep_rate, args.layers, args.fills, args.indices, images)
    with torch.inference_mode():
        rates = interleaved_rates(timed, batch_size, images.device, args.repeats, args.warmup, args.calls_per_repeat)
    return cold_rates(rates, batch_size)


def summary(rates: dict[str, list[float]]) -> dict[str, dict[str, Optional[float]]]:
    """Median images/s and median per-repeat speed-up of every call, and the share of the
    reduced model's saving each restored call (or the replayed work alone) gives up.

    The share is paired within repeats: the median over repeats of the time per image a
    restored call adds to the reduced call of the same repeat (for the work alone, its own
    time) over the median of the time per image the reduced call saves on the unpatched
    one. Times of calls a few seconds apart share the machine's slow and fast spells, so
    their differences are steadier than differences of separately taken medians."""
    base = rates["unpatched"]
    reduced_name = next(name for name in rates if "reduced" in name)
    reduced = rates[reduced_name]
    saved = statistics.median(1 / b - 1 / r for b, r in zip(base, reduced))
    result: dict[str, dict[str, Optional[float]]] = {}
    for name, values in rates.items():
        speedup = statistics.median(v / b for v, b in zip(values, base))
        eaten: Optional[float] = None
        if "restored" in name:
            eaten = statistics.median(1 / v - 1 / r for v, r in zip(values, reduced)) / saved
        elif "alone" in name:  # times per image: unpatched u, reduced r, work w; speed-up u / (r + w)
            speedup = statistics.median((1 / b) / (1 / r + 1 / w) for b, r, w in zip(base, reduced, values))
            eaten = statistics.median(1 / w for w in values) / saved
        result[name] = {"images_per_second": statistics.median(values), "speedup": speedup,
                        "share_of_speedup_eaten": eaten if saved > 0 else None}
    return result


def markdown(results: dict[int, dict[str, dict[str, float]]], setup: dict) -> str:
    lines = [f"{setup['model']} (random weights), cpu ({setup['threads']} threads), inference fp32, "
             f"forward_intermediates(indices={setup['indices']}, norm=True, output_fmt='NLC'); median of "
             f"{setup['repeats']} interleaved repeats of {setup['calls_per_repeat']} calls",
             "", "| batch | call | ms per call | images/s | speed-up | share of EViT's speed-up eaten |",
             "|---|---|---|---|---|---|"]
    for batch, rows in results.items():
        for name, row in rows.items():
            eaten = row["share_of_speedup_eaten"]
            lines.append(f"| {batch} | {name} | {1000 * batch / row['images_per_second']:.2f} | "
                         f"{row['images_per_second']:.1f} | {row['speedup']:.3f}x | "
                         f"{'' if eaten is None else f'{100 * eaten:.1f}%'} |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--fills", nargs="+", default=["carry", "source"], choices=list(evit_patch.FILLS))
    parser.add_argument("--indices", type=int, nargs="+", default=[2, 5, 8, 11], help="blocks handed to the head")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calls-per-repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[int, dict[str, dict[str, float]]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {batch: summary(measure(args, batch)) for batch in args.batch_sizes}
    setup = {"model": args.model, "keep_rate": args.keep_rate, "layers": args.layers, "fills": args.fills,
             "indices": args.indices, "repeats": args.repeats, "calls_per_repeat": args.calls_per_repeat,
             "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__}
    table = markdown(results, setup)
    print(table)
    if args.out:
        write_results(args.out, table, {"setup": setup, "results": results})
    return results


if __name__ == "__main__":
    main()
