"""Speed of EViT on rotary-position ViTs beside DeiT-S, and what following the positions costs.

For each model (random weights) and batch size, in one process and interleaved repeat by
repeat (:func:`evit_patch.tuning.timing.paired_speeds`): the unpatched model, EViT at the
paper's placement (blocks 4, 7, 10 of 12) and keep rate, and the same patched model with its
position rows precomputed ("positions free": the rows each later block receives are looked up
from a first call on the same images instead of gathered), so the gap between the two is the
cost of following the positions. The speed-up is reported next to the MAC ratio, and its
efficiency (speed-up / MAC ratio) next to DeiT-S's, which has no positions to follow.

    python benchmarks/rotary_speed.py --batch-sizes 1 32 --repeats 9 \\
        --out benchmarks/results/rotary_speed_cpu

Writes ``<out>.json`` and ``<out>.md``. ``--device cuda --dtype bf16`` is step 5 of
``benchmarks/device_run.sh``; ``--model-kwargs`` and ``--layers`` shrink the models for its
``--quick`` form.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import timm
import torch
from torch import nn

import evit_patch
from evit_patch.core.model_info import example_images
from evit_patch.tools.results import write_results
from evit_patch.tuning.timing import paired_speeds, positive_int, spread_warning

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

MODELS = ["deit_small_patch16_224", "eva02_small_patch14_224", "vit_small_patch16_dinov3"]
PAPER_LAYERS = [3, 6, 9]


def autocast(images: torch.Tensor, dtype: str):
    return torch.autocast(images.device.type, DTYPES[dtype] or torch.float32, enabled=dtype != "fp32")


def with_positions_free(patched: nn.Module, images: torch.Tensor, dtype: str) -> nn.Module:
    """A copy of ``patched`` that is handed, for ``images`` only, the rows its positions follow
    to without gathering them: the work left is everything but following the positions."""
    model = copy.deepcopy(patched)
    state = model.evit_state
    gathered: dict[tuple[int, str], torch.Tensor] = {}
    follow = state.followed_input

    def recorded(stage: int, name: str, value: torch.Tensor) -> torch.Tensor:
        gathered[(stage, name)] = follow(stage, name, value)
        return gathered[(stage, name)]

    state.followed_input = recorded
    with torch.no_grad(), autocast(images, dtype):
        model(images)
    state.followed_input = lambda stage, name, value: gathered[(stage, name)]
    return model


def measure(name: str, batch: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    unpatched = timm.create_model(name, **args.model_kwargs).eval()
    unpatched_macs = evit_patch.count_macs(unpatched)
    unpatched = unpatched.to(args.device)
    images = example_images(unpatched, batch).to(args.device)
    keep_rate = args.keep_rate
    patched = evit_patch.apply_evit(copy.deepcopy(unpatched), args.layers, keep_rate)
    models = {"unpatched": unpatched, "evit": patched}
    if patched.evit_state.positions:
        models["evit, positions free"] = with_positions_free(patched, images, args.dtype)
        with torch.no_grad(), autocast(images, args.dtype):
            assert torch.equal(models["evit, positions free"](images), patched(images))
    with torch.no_grad():
        speeds = paired_speeds(models, images, repeats=args.repeats, dtype=DTYPES[args.dtype])
    mac_ratio = unpatched_macs / evit_patch.count_macs(copy.deepcopy(patched).cpu())
    row = {"model": name, "batch": batch, "keep_rate": keep_rate, "mac_ratio": mac_ratio,
           "speedup": speeds["evit"].speedup, "spread": speeds["evit"].spread,
           "efficiency": speeds["evit"].speedup / mac_ratio, "warning": spread_warning(speeds)}
    if "evit, positions free" in speeds:
        free = speeds["evit, positions free"].speedup
        row.update(speedup_positions_free=free, following_cost=1 - speeds["evit"].speedup / free)
    return row


def markdown(rows: list[dict], setup: dict) -> str:
    lines = [f"EViT at blocks {setup['layers']}, keep {setup['keep_rate']}, random weights, {setup['dtype']} on "
             f"{setup['device']}, {setup['threads']} CPU threads, medians of {setup['repeats']} paired repeats "
             f"(torch {setup['torch']}).", "",
             "| model | batch | MAC ratio | speed-up | efficiency (speed-up / MAC ratio) | vs DeiT-S's efficiency | "
             "speed-up, positions free | cost of following positions |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        deit = next(r for r in rows if r["model"] == MODELS[0] and r["batch"] == row["batch"])
        relative = row["efficiency"] / deit["efficiency"]
        free = f"{row['speedup_positions_free']:.3f}" if "speedup_positions_free" in row else "—"
        cost = f"{100 * row['following_cost']:.1f}%" if "following_cost" in row else "—"
        lines.append(f"| {row['model']} | {row['batch']} | {row['mac_ratio']:.3f} | {row['speedup']:.3f} "
                     f"(+-{100 * row['spread']:.1f}%) | {row['efficiency']:.3f} | {relative:.3f} | {free} | {cost} |")
    warnings = sorted({row["warning"] for row in rows if row["warning"]})
    return "\n".join(lines + ([""] + warnings if warnings else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 32])
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON given to every timm.create_model")
    parser.add_argument("--layers", type=int, nargs="+", default=PAPER_LAYERS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.models[0] != MODELS[0]:
        parser.error(f"the first model must be {MODELS[0]}, the reference the others' efficiency is compared with")
    torch.set_num_threads(args.threads)
    rows = [measure(name, batch, args) for batch in args.batch_sizes for name in args.models]
    setup = {"keep_rate": args.keep_rate, "layers": args.layers, "repeats": args.repeats, "threads": args.threads,
             "device": str(args.device), "dtype": args.dtype, "model_kwargs": args.model_kwargs,
             "torch": torch.__version__}
    table = markdown(rows, setup)
    print(table)
    write_results(args.out, table, {"setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
