"""What restoring the full grid costs of EViT's speed-up, timed side by side in one process.

    python benchmarks/dense_speed.py --batch-sizes 1 32 --repeats 15 --calls-per-repeat 2 --out benchmarks/results/dense_speed_deit_s_cpu

A dense consumer's call, ``forward_intermediates(x, indices, norm=True, output_fmt="NLC")``,
on the unpatched model and on EViT (keep 0.7, blocks 3, 6, 9) with each restoration fill,
beside the same timm code on EViT without restoration (the reduced sequences; NLC needs no
grid, so it runs): the speed-up there is the one to keep. Random weights of
``--model`` (DeiT-S by default); inference, fp32, every call timed interleaved in
rotating order (``evit_patch.tools.timing``). The share of the speed-up restoration eats
is ``(S_reduced - S_restored) / (S_reduced - 1)``, S the median of per-repeat speed-ups
over the unpatched model. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Callable, Optional

import timm
import torch

import evit_patch
from evit_patch.core.model_info import example_images
from evit_patch.tools.timing import interleaved_rates


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

    return {"unpatched": dense(base), f"EViT {keep_rate} reduced (no restoration)": without_restoration,
            **{f"EViT {keep_rate} restored ({fill})": dense(model) for fill, model in patched.items()}}


def measure(args: argparse.Namespace, batch_size: int) -> dict[str, list[float]]:
    images = example_images(timm.create_model(args.model), batch_size, seed=0)
    timed = calls(args.model, args.keep_rate, args.layers, args.fills, args.indices, images)
    with torch.inference_mode():
        return interleaved_rates(timed, batch_size, images.device, args.repeats, args.warmup, args.calls_per_repeat)


def summary(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median images/s and median per-repeat speed-up of every call, and the share of the
    reduced model's speed-up each restored call gives up."""
    base = rates["unpatched"]
    speedups = {name: statistics.median(v / b for v, b in zip(values, base)) for name, values in rates.items()}
    reduced = next(value for name, value in speedups.items() if "reduced" in name)
    result = {}
    for name, values in rates.items():
        eaten = (reduced - speedups[name]) / (reduced - 1) if "restored" in name and reduced > 1 else None
        result[name] = {"images_per_second": statistics.median(values), "speedup": speedups[name],
                        "share_of_speedup_eaten": eaten}
    return result


def markdown(results: dict[int, dict[str, dict[str, float]]], setup: dict) -> str:
    lines = [f"{setup['model']} (random weights), cpu ({setup['threads']} threads), inference fp32, "
             f"forward_intermediates(indices={setup['indices']}, norm=True, output_fmt='NLC'); median of {setup['repeats']} interleaved "
             f"repeats of {setup['calls_per_repeat']} calls",
             "", "| batch | call | images/s | speed-up | share of EViT's speed-up eaten |", "|---|---|---|---|---|"]
    for batch, rows in results.items():
        for name, row in rows.items():
            eaten = row["share_of_speedup_eaten"]
            lines.append(f"| {batch} | {name} | {row['images_per_second']:.1f} | {row['speedup']:.3f}x | "
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
